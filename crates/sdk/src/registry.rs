//! The model registry: base models, round checkpoints, metrics and final models.
//!
//! [`Registry`] is the interface; [`LocalRegistry`] keeps everything in a directory:
//!
//! ```text
//! {root}/models/{name}/{version}.safetensors     base models (load_model / save_model)
//! {root}/jobs/{jobId}/rounds/round-00001.safetensors   global model after each round
//! {root}/jobs/{jobId}/final.safetensors          the final global model
//! {root}/jobs/{jobId}/metrics.jsonl              one MetricRecord (JSON) per line
//! {root}/jobs/{jobId}/resume/{taskId}.safetensors what an aggregating task needs to resume
//! {root}/jobs/{jobId}/{group}/rounds/…, …/final.safetensors
//!                                                the models of a task in a named group
//! ```
//!
//! A job can hold several independent models (parallel experiments: one aggregator per
//! region). [`for_task`] scopes a task's model files by the groups it is in other than
//! `default`, so each regional aggregator keeps its own rounds and final model; a task only in
//! `default` groups (the usual two-tier or hierarchical top aggregator) writes to the job
//! directory itself. Metrics stay in one file per job, told apart by task id.
//!
//! Models are safetensors files (never pickle); the tensor order is kept in the metadata key
//! `fledge.order` because safetensors itself sorts tensors. Files are written to a temporary
//! name and renamed, so a reader never sees half a checkpoint.
//!
//! The registry of a task comes from its config's `registry` {sort, uri}: sort `local` (the
//! default) with `uri` a directory path (`file://` prefix allowed); an empty uri means
//! `./registry` under the working directory. Sort `mlflow` with `uri` an MLflow tracking
//! server's URL is [`MlflowRegistry`] (runs, metrics, artifacts and registered models in
//! MLflow, through a local spool that keeps every write until MLflow has it). Sort `s3` with
//! `uri` `s3://bucket/prefix` is [`S3Registry`]: this layout in an S3-compatible bucket.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fledge_algorithms::{ServerState, Tensor, Weights};
use fledge_types::{JobId, MetricRecord, RegistrySpec, TaskConfig, TaskId};
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};

use crate::{Error, Result};

pub mod mlflow;
pub mod s3;

pub use mlflow::MlflowRegistry;
pub use s3::S3Registry;

/// Metadata key holding the comma-separated tensor order.
const ORDER_KEY: &str = "fledge.order";

/// Where models and metrics are kept.
pub trait Registry: Send + Sync {
    /// The base model `name` at `version`, or `None` if the registry does not have it.
    fn load_model(&self, name: &str, version: i64) -> Result<Option<Weights>>;
    /// Stores a model as `name` at `version`.
    fn save_model(&self, name: &str, version: i64, weights: &Weights) -> Result<PathBuf>;
    /// Stores the global model after `round`.
    fn save_round(&self, job: &JobId, round: u64, weights: &Weights) -> Result<PathBuf>;
    /// Stores the final global model.
    fn save_final(&self, job: &JobId, weights: &Weights) -> Result<PathBuf>;
    /// Appends metric records.
    fn append_metrics(&self, job: &JobId, records: &[MetricRecord]) -> Result<()>;
    /// Replaces, atomically, what aggregating task `task` needs to go on after a restart.
    fn save_resume(&self, job: &JobId, task: &TaskId, state: &ResumeState) -> Result<()>;
    /// What `task` saved last, or `None` if it never saved (its first run).
    fn load_resume(&self, job: &JobId, task: &TaskId) -> Result<Option<ResumeState>>;
    /// The most recent metric records of `task` that this registry holds. A resumed task
    /// sends them to the control plane again: records still queued when the failed run died
    /// were lost with it, and the store keeps a record sent twice once. Default: none.
    fn recent_metrics(&self, _job: &JobId, _task: &TaskId) -> Result<Vec<MetricRecord>> {
        Ok(Vec::new())
    }
    /// Called once when the task ends (`succeeded` or not): returns when everything written
    /// is where the registry keeps it, or with an error saying what is not and where it is
    /// kept. A local registry writes through, so it has nothing to do.
    fn finish(&self, _succeeded: bool) -> Result<()> {
        Ok(())
    }
}

/// What a stateful task persists after each round so that, redeployed under the same id
/// after a crash, it goes on from the next round with the same state: the global model, the
/// server optimizer's moments, the selector's memory, the round and model version, and the
/// round's metric record (re-sent on resume; the store keeps a record once).
///
/// Aggregators fill every field; the other stateful roles use what they have: the
/// coordinator saves no model (an empty `global`) and its assignment as `selector`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResumeState {
    /// The last round completed.
    pub round: u64,
    /// The model version after it.
    pub model_version: u64,
    /// The global model after it (empty for a role without a model).
    pub global: Weights,
    /// The server optimizer's state (FedAdam, FedYogi, FedAdaGrad).
    pub server: Option<ServerState>,
    /// The selector's memory ([`fledge_algorithms::Selector::state`]; the coordinator's
    /// last assignment).
    pub selector: serde_json::Value,
    /// The round's metric record.
    pub record: Option<MetricRecord>,
    /// Central DP's state: `{"rounds": n, "clippingNorm": c}` (ε is recomputed from it).
    pub privacy: Option<serde_json::Value>,
}

/// Metadata key of a resume file's JSON (round, model version, optimizer steps, selector,
/// record); its tensors are the global model's, and the moments as `fledge.m/NAME`,
/// `fledge.v/NAME`.
const RESUME_KEY: &str = "fledge.resume";
const MOMENT_M: &str = "fledge.m/";
const MOMENT_V: &str = "fledge.v/";

/// The JSON part of a resume file.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ResumeMeta {
    round: u64,
    model_version: u64,
    /// Optimizer steps, when it has a server state.
    server_steps: Option<u64>,
    selector: serde_json::Value,
    record: Option<MetricRecord>,
    #[serde(default)]
    privacy: Option<serde_json::Value>,
}

/// Writes a resume file (see [`RESUME_KEY`]).
fn write_resume(out: &mut impl Write, state: &ResumeState) -> std::io::Result<()> {
    let mut tensors: Vec<(String, &Tensor)> =
        state.global.tensors().iter().map(|t| (t.name().to_owned(), t)).collect();
    if let Some(ServerState { moments: Some((m, v)), .. }) = &state.server {
        tensors.extend(m.tensors().iter().map(|t| (format!("{MOMENT_M}{}", t.name()), t)));
        tensors.extend(v.tensors().iter().map(|t| (format!("{MOMENT_V}{}", t.name()), t)));
    }
    let meta = ResumeMeta {
        round: state.round,
        model_version: state.model_version,
        server_steps: state.server.as_ref().map(|s| s.steps),
        selector: state.selector.clone(),
        record: state.record.clone(),
        privacy: state.privacy.clone(),
    };
    let mut header = order_meta(&state.global);
    header.insert(
        RESUME_KEY.to_owned(),
        serde_json::to_string(&meta).map_err(std::io::Error::other)?,
    );
    write_tensors(out, tensors, header)
}

/// Reads a resume file written by [`write_resume`].
fn read_resume(path: &str, bytes: &[u8]) -> Result<ResumeState> {
    let bad = |reason: String| Error::Safetensors { path: path.to_owned(), reason };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().as_ref();
    let json = meta
        .and_then(|m| m.get(RESUME_KEY))
        .ok_or_else(|| bad(format!("no {RESUME_KEY} metadata")))?;
    let order = meta
        .and_then(|m| m.get(ORDER_KEY))
        .ok_or_else(|| bad(format!("no {ORDER_KEY} metadata")))?;
    let resume: ResumeMeta =
        serde_json::from_str(json).map_err(|e| bad(format!("bad {RESUME_KEY}: {e}")))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let read = |prefix: &str| -> Result<Weights> {
        let mut weights = Weights::new();
        // A role without a model (the coordinator) saves an empty order.
        for name in order.split(',').filter(|n| !n.is_empty()) {
            let full = format!("{prefix}{name}");
            let view = st.tensor(&full).map_err(|e| bad(format!("tensor {full}: {e}")))?;
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!("tensor {full} is {:?}, not F32", view.dtype())));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let t =
                Tensor::new(name, view.shape().to_vec(), data).map_err(|e| bad(e.to_string()))?;
            weights.push(t).map_err(|e| bad(e.to_string()))?;
        }
        Ok(weights)
    };
    let global = read("")?;
    let server = match resume.server_steps {
        None => None,
        Some(steps) => {
            let has_moments = st.names().iter().any(|n| n.starts_with(MOMENT_M));
            let moments = if has_moments { Some((read(MOMENT_M)?, read(MOMENT_V)?)) } else { None };
            Some(ServerState { steps, moments })
        }
    };
    Ok(ResumeState {
        round: resume.round,
        model_version: resume.model_version,
        global,
        server,
        selector: resume.selector,
        record: resume.record,
        privacy: resume.privacy,
    })
}

/// A registry in a local directory.
#[derive(Clone, Debug)]
pub struct LocalRegistry {
    root: PathBuf,
    /// Sub-directory of the job directory for model files (see [`for_task`]).
    scope: Option<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Registry { path: path.display().to_string(), source }
}

/// Checks a path component that comes from config (job id, model name).
fn component(kind: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{kind} {value:?} cannot be used as a registry path component (letters, digits, - _ . only)"
        )))
    }
}

impl LocalRegistry {
    /// A registry rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> LocalRegistry {
        LocalRegistry { root: root.into(), scope: None }
    }

    /// The same registry with model files (rounds, final) in `scope` under the job directory.
    /// The scope is checked when a model is written: a task that writes none never fails on it.
    pub fn scoped(mut self, scope: &str) -> LocalRegistry {
        self.scope = Some(scope.to_owned());
        self
    }

    /// Directory of `job`'s model files: the job directory, or its scope below it.
    pub fn models_dir(&self, job: &JobId) -> Result<PathBuf> {
        let dir = self.job_dir(job)?;
        match &self.scope {
            Some(scope) => {
                component("model scope (the task's group names)", scope)?;
                Ok(dir.join(scope))
            }
            None => Ok(dir),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of `job`.
    pub fn job_dir(&self, job: &JobId) -> Result<PathBuf> {
        component("job id", job.as_str())?;
        Ok(self.root.join("jobs").join(job.as_str()))
    }

    /// The resume file of `task` (see [`ResumeState`]).
    fn resume_path(&self, job: &JobId, task: &TaskId) -> Result<PathBuf> {
        component("task id", task.as_str())?;
        Ok(self.models_dir(job)?.join("resume").join(format!("{task}.safetensors")))
    }

    fn model_path(&self, name: &str, version: i64) -> Result<PathBuf> {
        component("model name", name)?;
        Ok(self.root.join("models").join(name).join(format!("{version}.safetensors")))
    }
}

/// Writes `weights` as a safetensors file at `path` atomically (temp file + rename), creating
/// parent directories. The file is streamed ([`write_safetensors`]): no copy of the model or
/// of the file is held in memory, which for a large model is what bounds an aggregator's
/// peak while it checkpoints.
fn save_atomic(path: &Path, weights: &Weights) -> Result<()> {
    write_atomic(path, |out| write_safetensors(out, weights))
}

/// Writes a file at `path` atomically and durably with `write` (see [`save_atomic`]).
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    // Durable before it is visible: the bytes reach the disk, then the rename does (a crash
    // leaves the old file or the new one, never a torn or empty one under the final name).
    fledge_durable::write_with(path, None, write).map_err(io_err(path))
}

/// Values encoded at a time while streaming a tensor (a 16 KiB stack buffer).
const ENCODE_VALUES: usize = 4096;

/// Writes `weights` in the safetensors format to `out`: the header, then each tensor's
/// values as little-endian bytes, encoded a few kilobytes at a time.
///
/// The bytes are exactly those of `safetensors::serialize` (the header is the crate's own
/// [`Metadata`]; tensors are laid out in its order, by name since all are `F32`), so any
/// safetensors reader loads the file.
pub fn write_safetensors(out: &mut impl Write, weights: &Weights) -> std::io::Result<()> {
    let tensors: Vec<(String, &Tensor)> =
        weights.tensors().iter().map(|t| (t.name().to_owned(), t)).collect();
    write_tensors(out, tensors, order_meta(weights))
}

/// The metadata naming `weights`' tensor order.
fn order_meta(weights: &Weights) -> HashMap<String, String> {
    let order: Vec<&str> = weights.tensors().iter().map(Tensor::name).collect();
    HashMap::from([(ORDER_KEY.to_owned(), order.join(","))])
}

/// Writes named tensors and `meta` as a safetensors file (see [`write_safetensors`]).
fn write_tensors(
    out: &mut impl Write,
    mut sorted: Vec<(String, &Tensor)>,
    meta: HashMap<String, String>,
) -> std::io::Result<()> {
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut offset = 0;
    let infos = sorted
        .iter()
        .map(|(name, t)| {
            let len = t.data().len() * 4;
            let info = TensorInfo {
                dtype: Dtype::F32,
                shape: t.shape().to_vec(),
                data_offsets: (offset, offset + len),
            };
            offset += len;
            (name.clone(), info)
        })
        .collect();
    let header = Metadata::new(Some(meta), infos).map_err(std::io::Error::other)?;
    let mut header = serde_json::to_string(&header).map_err(std::io::Error::other)?.into_bytes();
    // The header is padded with spaces to a multiple of 8 bytes, as the crate does.
    header.resize(header.len().next_multiple_of(8), b' ');
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let mut buf = [0u8; ENCODE_VALUES * 4];
    for (_, t) in sorted {
        for values in t.data().chunks(ENCODE_VALUES) {
            for (bytes, v) in buf.chunks_exact_mut(4).zip(values) {
                bytes.copy_from_slice(&v.to_le_bytes());
            }
            out.write_all(&buf[..values.len() * 4])?;
        }
    }
    Ok(())
}

/// Encodes weights as a safetensors file body in memory (see [`write_safetensors`]; the
/// registry streams its files instead).
pub fn to_safetensors(weights: &Weights) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    write_safetensors(&mut bytes, weights).map_err(|e| Error::Tensors(e.to_string()))?;
    Ok(bytes)
}

/// Decodes a safetensors file body (`f32` tensors; order from the metadata when present).
pub fn from_safetensors(path: &str, bytes: &[u8]) -> Result<Weights> {
    let bad = |reason: String| Error::Safetensors { path: path.to_owned(), reason };
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    if let Some(order) = meta.metadata().as_ref().and_then(|m| m.get(ORDER_KEY)) {
        let listed: Vec<String> = order.split(',').map(str::to_owned).collect();
        let mut sorted = listed.clone();
        sorted.sort();
        if sorted == names {
            names = listed;
        }
    }
    let mut res = Weights::new();
    for name in names {
        let view = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("tensor {name} is {:?}, only F32 is supported", view.dtype())));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = Tensor::new(&name, view.shape().to_vec(), data).map_err(|e| bad(e.to_string()))?;
        res.push(t).map_err(|e| bad(e.to_string()))?;
    }
    Ok(res)
}

impl Registry for LocalRegistry {
    fn load_model(&self, name: &str, version: i64) -> Result<Option<Weights>> {
        let path = self.model_path(name, version)?;
        match std::fs::read(&path) {
            Ok(bytes) => from_safetensors(&path.display().to_string(), &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn save_model(&self, name: &str, version: i64, weights: &Weights) -> Result<PathBuf> {
        let path = self.model_path(name, version)?;
        save_atomic(&path, weights)?;
        Ok(path)
    }

    fn save_round(&self, job: &JobId, round: u64, weights: &Weights) -> Result<PathBuf> {
        let path =
            self.models_dir(job)?.join("rounds").join(format!("round-{round:05}.safetensors"));
        save_atomic(&path, weights)?;
        Ok(path)
    }

    fn save_final(&self, job: &JobId, weights: &Weights) -> Result<PathBuf> {
        let path = self.models_dir(job)?.join("final.safetensors");
        save_atomic(&path, weights)?;
        Ok(path)
    }

    fn save_resume(&self, job: &JobId, task: &TaskId, state: &ResumeState) -> Result<()> {
        let path = self.resume_path(job, task)?;
        write_atomic(&path, |out| write_resume(out, state))
    }

    fn load_resume(&self, job: &JobId, task: &TaskId) -> Result<Option<ResumeState>> {
        let path = self.resume_path(job, task)?;
        match std::fs::read(&path) {
            Ok(bytes) => read_resume(&path.display().to_string(), &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn recent_metrics(&self, job: &JobId, task: &TaskId) -> Result<Vec<MetricRecord>> {
        let path = self.job_dir(job)?.join("metrics.jsonl");
        // The tail may start inside a line: anything that does not parse is skipped.
        let recent = tail(&path, METRICS_TAIL_BYTES)?;
        Ok(recent
            .lines()
            .filter_map(|line| serde_json::from_str::<MetricRecord>(line).ok())
            .filter(|r| &r.task_id == task)
            .collect())
    }

    fn append_metrics(&self, job: &JobId, records: &[MetricRecord]) -> Result<()> {
        let dir = self.job_dir(job)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join("metrics.jsonl");
        // A record sent again (a resumed aggregator re-sends its last round's, which may have
        // been written before the crash) is among the last lines if it is there at all.
        let recent = tail(&path, METRICS_TAIL_BYTES)?;
        let mut text = String::new();
        for r in records {
            let line = serde_json::to_string(r).expect("metric records serialise");
            if r.timestamp.is_some() && recent.lines().chain(text.lines()).any(|l| l == line) {
                continue;
            }
            text.push_str(&line);
            text.push('\n');
        }
        if text.is_empty() {
            return Ok(());
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(text.as_bytes()).map_err(io_err(&path))
    }
}

/// How much of the end of `metrics.jsonl` is searched for a record sent again.
const METRICS_TAIL_BYTES: u64 = 256 << 10;

/// The last `bytes` of the file at `path` (empty if it does not exist), lossily decoded.
fn tail(path: &Path, bytes: u64) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let len = file.metadata().map_err(io_err(path))?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(bytes))).map_err(io_err(path))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(io_err(path))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The job's base model (`modelSpec.baseModel`) read from `registry` off the async runtime;
/// `None` when the job names none, an error naming it when the registry does not hold it.
pub async fn load_base_model(
    registry: Arc<dyn Registry>,
    base: &fledge_types::BaseModel,
) -> Result<Option<Weights>> {
    if base.name.is_empty() {
        return Ok(None);
    }
    let (name, version) = (base.name.clone(), base.version);
    let model = tokio::task::spawn_blocking(move || registry.load_model(&name, version))
        .await??
        .ok_or_else(|| {
            Error::Config(format!(
                "baseModel {} version {} is not in the registry",
                base.name, base.version
            ))
        })?;
    tracing::info!(name = %base.name, version = base.version, params = model.num_params(), "loaded base model");
    Ok(Some(model))
}

/// The local registry named by a `registry` spec, relative paths under `workdir`; a spec of
/// another sort is refused (MLflow needs the task: [`for_task`]).
pub fn from_spec(spec: &RegistrySpec, workdir: &Path) -> Result<Arc<dyn Registry>> {
    Ok(Arc::new(local_from_spec(spec, workdir)?))
}

/// The registry of one task, from its config's `registry` spec (relative paths under
/// `workdir`), with the task's model files scoped by the groups it is in other than `default`
/// (sorted, joined with `+`), so independent models of one job do not overwrite each other.
/// For MLflow the scope names the registered model (`{job name}.{scope}`).
pub fn for_task(config: &TaskConfig, workdir: &Path) -> Result<Arc<dyn Registry>> {
    let groups: std::collections::BTreeSet<&str> = config
        .group_association
        .values()
        .map(String::as_str)
        .filter(|group| *group != fledge_types::DEFAULT_GROUP)
        .collect();
    let scope = (!groups.is_empty()).then(|| groups.into_iter().collect::<Vec<_>>().join("+"));
    if config.registry.sort == MLFLOW {
        return Ok(Arc::new(MlflowRegistry::for_task(config, scope.as_deref(), workdir)?));
    }
    if config.registry.sort == s3::S3 {
        return Ok(Arc::new(S3Registry::new(&config.registry, scope.as_deref())?));
    }
    let registry = local_from_spec(&config.registry, workdir)?;
    Ok(match scope {
        Some(scope) => Arc::new(registry.scoped(&scope)),
        None => Arc::new(registry),
    })
}

/// The registry sort of an MLflow tracking server.
pub const MLFLOW: &str = "mlflow";

fn local_from_spec(spec: &RegistrySpec, workdir: &Path) -> Result<LocalRegistry> {
    match spec.sort.as_str() {
        "" | "local" => {
            let uri = spec.uri.strip_prefix("file://").unwrap_or(&spec.uri);
            let root = if uri.is_empty() { workdir.join("registry") } else { workdir.join(uri) };
            Ok(LocalRegistry::new(root))
        }
        other => Err(Error::Config(format!(
            "registry.sort {other:?} is not a local registry (use local, or mlflow or s3 \
             through the task's config)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn model(v: f32) -> Weights {
        Weights::from_tensors(vec![
            Tensor::new("z.weight", vec![2, 2], vec![v, 2.0, 3.0, 4.0]).expect("t"),
            Tensor::new("a.bias", vec![2], vec![0.5, v]).expect("t"),
        ])
        .expect("w")
    }

    #[test]
    fn resume_state_round_trips_and_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let reg = LocalRegistry::new(dir.path()).scoped("eu");
        let (job, task) = (JobId::from("job-1"), TaskId::from("agg-0"));
        assert_eq!(reg.load_resume(&job, &task).expect("none yet"), None);
        let record = MetricRecord {
            task_id: task.clone(),
            role: "aggregator".into(),
            round: 7,
            metrics: BTreeMap::from([("global.accuracy".to_owned(), 0.91)]),
            timestamp: Some(chrono::DateTime::from_timestamp(1_800_000_000, 5).expect("ts")),
        };
        let state = ResumeState {
            round: 7,
            model_version: 7,
            global: model(1.5),
            server: Some(ServerState { steps: 7, moments: Some((model(0.25), model(0.125))) }),
            selector: serde_json::json!({"inFlight": [], "stats": {}}),
            record: Some(record),
            privacy: Some(serde_json::json!({"rounds": 7, "clippingNorm": 0.5})),
        };
        reg.save_resume(&job, &task, &state).expect("save");
        assert!(dir.path().join("jobs/job-1/eu/resume/agg-0.safetensors").exists());
        assert_eq!(reg.load_resume(&job, &task).expect("load"), Some(state.clone()));
        // The next round replaces it; a state without moments reads back without them.
        let next = ResumeState {
            round: 8,
            server: Some(ServerState { steps: 8, moments: None }),
            record: None,
            ..state
        };
        reg.save_resume(&job, &task, &next).expect("save");
        assert_eq!(reg.load_resume(&job, &task).expect("load"), Some(next));
        let plain = ResumeState {
            server: None,
            round: 9,
            ..reg.load_resume(&job, &task).unwrap().unwrap()
        };
        reg.save_resume(&job, &task, &plain).expect("save");
        assert_eq!(reg.load_resume(&job, &task).expect("load"), Some(plain.clone()));
        // A role without a model (the coordinator) saves an empty one and reads it back.
        let modelless = ResumeState {
            global: Weights::new(),
            selector: serde_json::json!({"trainersOf": {"m0": ["t0"]}}),
            ..plain
        };
        reg.save_resume(&job, &task, &modelless).expect("save");
        assert_eq!(reg.load_resume(&job, &task).expect("load"), Some(modelless));
        // A damaged file is an error naming it, not a silent fresh start.
        std::fs::write(dir.path().join("jobs/job-1/eu/resume/agg-0.safetensors"), b"junk").unwrap();
        let err = reg.load_resume(&job, &task).expect_err("damaged").to_string();
        assert!(err.contains("agg-0.safetensors"), "{err}");
        assert!(reg.load_resume(&job, &TaskId::from("../x")).is_err());
    }

    #[test]
    fn writes_and_reads_checkpoints_models_and_metrics() {
        let dir = tempfile::tempdir().expect("tmp");
        let reg = LocalRegistry::new(dir.path());
        let job = JobId::from("job-1");
        let p = reg.save_round(&job, 3, &model(1.0)).expect("save");
        assert!(p.ends_with("jobs/job-1/rounds/round-00003.safetensors"));
        let back = from_safetensors("x", &std::fs::read(&p).expect("read")).expect("decode");
        assert_eq!(back, model(1.0), "order and values survive");
        reg.save_final(&job, &model(2.0)).expect("final");
        assert!(dir.path().join("jobs/job-1/final.safetensors").exists());
        assert_eq!(reg.load_model("mnist", 1).expect("ok"), None);
        reg.save_model("mnist", 1, &model(5.0)).expect("save");
        assert_eq!(reg.load_model("mnist", 1).expect("ok"), Some(model(5.0)));
        let rec = MetricRecord {
            task_id: "t1".into(),
            role: "aggregator".into(),
            round: 1,
            metrics: BTreeMap::from([("accuracy".to_owned(), 0.5)]),
            timestamp: None,
        };
        reg.append_metrics(&job, std::slice::from_ref(&rec)).expect("append");
        reg.append_metrics(&job, std::slice::from_ref(&rec)).expect("append");
        let text =
            std::fs::read_to_string(dir.path().join("jobs/job-1/metrics.jsonl")).expect("read");
        let lines: Vec<MetricRecord> =
            text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
        assert_eq!(lines, vec![rec.clone(), rec.clone()], "records without a timestamp: each kept");
        // A timestamped record sent again is kept once.
        let stamped = MetricRecord {
            timestamp: Some(chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("ts")),
            ..rec
        };
        reg.append_metrics(&job, &[stamped.clone(), stamped.clone()]).expect("append");
        reg.append_metrics(&job, std::slice::from_ref(&stamped)).expect("append");
        let text =
            std::fs::read_to_string(dir.path().join("jobs/job-1/metrics.jsonl")).expect("read");
        assert_eq!(text.lines().count(), 3);
        // What a resumed task sends again: its own records, the file's tail.
        let recent = reg.recent_metrics(&job, &"t1".into()).expect("recent");
        assert_eq!(recent.len(), 3);
        assert!(reg.recent_metrics(&job, &"t2".into()).expect("recent").is_empty());
    }

    /// The crate's own in-memory serialisation, as the registry wrote files before it
    /// streamed them.
    fn reference_bytes(weights: &Weights) -> Vec<u8> {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = weights
            .tensors()
            .iter()
            .map(|t| {
                let bytes = t.data().iter().flat_map(|v| v.to_le_bytes()).collect();
                (t.name().to_owned(), t.shape().to_vec(), bytes)
            })
            .collect();
        let views = data.iter().map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes);
            (name.clone(), view.expect("view"))
        });
        let order: Vec<&str> = weights.tensors().iter().map(Tensor::name).collect();
        let meta = HashMap::from([(ORDER_KEY.to_owned(), order.join(","))]);
        safetensors::serialize(views, Some(meta)).expect("serialize")
    }

    #[test]
    fn streamed_files_are_byte_identical_to_safetensors_serialize() {
        // Tensors out of name order, one longer than an encoding batch and not a multiple
        // of it, one empty.
        let long: Vec<f32> = (0..(ENCODE_VALUES * 2 + 7)).map(|i| i as f32 * 0.25 - 3.0).collect();
        let weights = Weights::from_tensors(vec![
            Tensor::new("z.weight", vec![2, 2], vec![1.0, -2.0, f32::MIN_POSITIVE, 4.5])
                .expect("t"),
            Tensor::new("m.long", vec![long.len()], long).expect("t"),
            Tensor::new("a.empty", vec![0], vec![]).expect("t"),
            Tensor::new("b.bias", vec![3], vec![0.5, 0.0, -0.0]).expect("t"),
        ])
        .expect("w");
        let dir = tempfile::tempdir().expect("tmp");
        let reg = LocalRegistry::new(dir.path());
        let path = reg.save_round(&JobId::from("job-1"), 1, &weights).expect("save");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes, reference_bytes(&weights));
        assert_eq!(to_safetensors(&weights).expect("encode"), bytes);
        let st = SafeTensors::deserialize(&bytes).expect("safetensors parses it");
        assert_eq!(st.len(), 4);
        assert_eq!(from_safetensors("x", &bytes).expect("decode"), weights);
        assert!(!path.with_extension("tmp").exists(), "the temporary file was renamed");
    }

    #[test]
    fn task_models_are_scoped_by_their_named_groups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = JobId::from("job-1");
        let plan = crate::plan::JobPlan::local("job-1", vec!["/d".to_owned()]);
        let mut config = plan.configs().expect("configs").remove(0);
        config.registry = RegistrySpec { sort: "local".into(), uri: "reg".into() };
        // Only default groups: the job directory itself.
        let reg = for_task(&config, dir.path()).expect("registry");
        let p = reg.save_final(&job, &model(1.0)).expect("final");
        assert!(p.ends_with("reg/jobs/job-1/final.safetensors"), "{}", p.display());
        // A regional aggregator: its own directory, metrics still shared.
        config.group_association.insert("param-channel".to_owned(), "eu".to_owned());
        config.group_association.insert("global-channel".to_owned(), "default".to_owned());
        let reg = for_task(&config, dir.path()).expect("registry");
        let p = reg.save_final(&job, &model(2.0)).expect("final");
        assert!(p.ends_with("reg/jobs/job-1/eu/final.safetensors"), "{}", p.display());
        let p = reg.save_round(&job, 1, &model(2.0)).expect("round");
        assert!(p.ends_with("reg/jobs/job-1/eu/rounds/round-00001.safetensors"));
        // A group name that is not a path component is refused, not used.
        config.group_association.insert("param-channel".to_owned(), "../x".to_owned());
        let reg = for_task(&config, dir.path()).expect("a registry that refuses the scope");
        let err = reg.save_final(&job, &model(3.0)).unwrap_err().to_string();
        assert!(err.contains("model scope"), "{err}");
    }

    #[test]
    fn rejects_bad_specs_paths_and_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let reg = LocalRegistry::new(dir.path());
        assert!(reg.save_round(&JobId::from("../x"), 1, &model(1.0)).is_err());
        assert!(reg.load_model("a/b", 1).unwrap_err().to_string().contains("a/b"));
        let err = from_safetensors("f.safetensors", b"garbage").unwrap_err().to_string();
        assert!(err.contains("f.safetensors"), "{err}");
        let spec = RegistrySpec { sort: "mlflow".into(), uri: String::new() };
        let err = from_spec(&spec, dir.path()).err().expect("mlflow rejected").to_string();
        assert!(err.contains("mlflow"), "{err}");
        let spec = RegistrySpec { sort: "local".into(), uri: String::new() };
        assert!(from_spec(&spec, dir.path()).is_ok());
    }
}
