//! Reading a job.json the way Flame users write it: `dataSpecPath` / `modelSpecPath` are
//! resolved relative to job.json, and a dataset id that names a `*.json` file stands for the
//! dataset registered from that file (resolved relative to the file holding the data spec).
//!
//! Everything here is local: [`load`] parses and checks every file before anything is sent,
//! and the caller registers the referenced dataset files and patches their ids in.

use std::path::{Path, PathBuf};

use fledge_types::{DataSpecEntry, DatasetId, DatasetSpec, JobSpec, ModelSpec};
use serde_json::Value;

use crate::input::{self, InputError};

/// A job spec read from disk with its dataset file references.
#[derive(Debug)]
pub struct JobFile {
    /// The spec with the data and model specs inline and the `*Path` fields cleared.
    pub spec: JobSpec,
    /// Dataset ids that named a file, in data spec order.
    pub dataset_files: Vec<DatasetFileRef>,
}

/// One dataset id of the data spec that names a dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFileRef {
    /// The file, resolved.
    pub path: PathBuf,
    /// Its parsed content.
    pub spec: DatasetSpec,
    /// Position in the data spec: entry index, group label, index in the group.
    pub entry: usize,
    /// Group label.
    pub group: String,
    /// Index in the group's list.
    pub index: usize,
}

/// The model-spec hyperparameter naming the aggregator's evaluation set (a dataset URL).
pub const EVAL_DATASET: &str = "evalDataset";

/// Loads `path` (a job.json). With `defaults_dir`, `dataSpec.json` / `modelSpec.json` in that
/// directory are used when job.json names neither inline specs nor paths (`fledgectl run`).
pub fn load(path: &Path, defaults_dir: Option<&Path>) -> Result<JobFile, InputError> {
    let mut spec: JobSpec = input::read_json(path)?;
    let base = path.parent().unwrap_or(Path::new("."));

    if let Some(dir) = defaults_dir {
        if spec.data_spec.is_empty() && spec.data_spec_path.is_none() {
            let candidate = dir.join("dataSpec.json");
            if candidate.is_file() {
                spec.data_spec_path = Some("dataSpec.json".to_owned());
            }
        }
        if spec.model_spec == ModelSpec::default() && spec.model_spec_path.is_none() {
            let candidate = dir.join("modelSpec.json");
            if candidate.is_file() {
                spec.model_spec_path = Some("modelSpec.json".to_owned());
            }
        }
    }

    let mut data_spec_base = base.to_owned();
    if let Some(rel) = spec.data_spec_path.take() {
        if !spec.data_spec.is_empty() {
            return Err(InputError::Other(format!(
                "{}: dataSpec and dataSpecPath are both set; keep one",
                path.display()
            )));
        }
        let data_path = base.join(&rel);
        spec.data_spec = input::read_json::<Vec<DataSpecEntry>>(&data_path)?;
        data_spec_base = data_path.parent().unwrap_or(base).to_owned();
    }
    let mut model_spec_base = base.to_owned();
    if let Some(rel) = spec.model_spec_path.take() {
        if spec.model_spec != ModelSpec::default() {
            return Err(InputError::Other(format!(
                "{}: modelSpec and modelSpecPath are both set; keep one",
                path.display()
            )));
        }
        let model_path = base.join(&rel);
        spec.model_spec = input::read_json(&model_path)?;
        model_spec_base = model_path.parent().unwrap_or(base).to_owned();
    }
    // The aggregator's evaluation set, like a dataset file's URL, may be relative to its file.
    if let Some(Value::String(url)) = spec.model_spec.hyperparameters.get_mut(EVAL_DATASET) {
        *url = input::resolve_file_url(url, &model_spec_base);
    }

    let mut dataset_files = Vec::new();
    for (entry_idx, entry) in spec.data_spec.iter().enumerate() {
        for (group, ids) in &entry.dataset_groups {
            for (index, id) in ids.iter().enumerate() {
                if is_file_ref(id) {
                    let file = data_spec_base.join(id.as_str());
                    let dataset = input::read_dataset(&file)?;
                    dataset_files.push(DatasetFileRef {
                        path: file,
                        spec: dataset,
                        entry: entry_idx,
                        group: group.clone(),
                        index,
                    });
                }
            }
        }
    }
    Ok(JobFile { spec, dataset_files })
}

/// Whether a data spec id names a dataset file rather than a registered dataset.
pub fn is_file_ref(id: &DatasetId) -> bool {
    id.as_str().to_ascii_lowercase().ends_with(".json")
}

impl JobFile {
    /// Replaces the file reference `file_ref` with the id of its registered dataset.
    pub fn resolve(&mut self, file_ref: &DatasetFileRef, id: DatasetId) {
        if let Some(slot) = self
            .spec
            .data_spec
            .get_mut(file_ref.entry)
            .and_then(|entry| entry.dataset_groups.get_mut(&file_ref.group))
            .and_then(|ids| ids.get_mut(file_ref.index))
        {
            *slot = id;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    const DATASET: &str = r#"{"name": "uk", "url": "file:///d/uk.csv", "realm": "default/eu/uk"}"#;

    #[test]
    fn spec_paths_and_dataset_files_resolve_beside_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let job = write(
            root,
            "job/job.json",
            r#"{"// a": "comment", "name": "j", "designId": "d",
                "dataSpecPath": "../specs/dataSpec.json", "modelSpecPath": "modelSpec.json"}"#,
        );
        write(
            root,
            "specs/dataSpec.json",
            r#"[{"role": "trainer", "datasetGroups": {"eu": ["ds-1", "data/uk.json"]}}]"#,
        );
        write(root, "specs/data/uk.json", DATASET);
        write(
            root,
            "job/modelSpec.json",
            r#"{"hyperparameters": {"rounds": 3, "evalDataset": "file:../specs/data"}}"#,
        );

        let mut file = load(&job, None).unwrap();
        assert_eq!(file.spec.data_spec_path, None);
        assert_eq!(file.spec.model_spec_path, None);
        assert_eq!(file.spec.model_spec.hyperparameters["rounds"], 3);
        let data = std::fs::canonicalize(root.join("specs/data")).unwrap();
        assert_eq!(
            file.spec.model_spec.hyperparameters[EVAL_DATASET],
            format!("file://{}", data.display()),
            "evalDataset resolves beside modelSpec.json"
        );
        assert_eq!(file.dataset_files.len(), 1);
        let file_ref = file.dataset_files[0].clone();
        assert_eq!(
            std::fs::canonicalize(&file_ref.path).unwrap(),
            std::fs::canonicalize(root.join("specs/data/uk.json")).unwrap()
        );
        assert_eq!(file_ref.spec.realm, "default/eu/uk");
        assert_eq!((file_ref.group.as_str(), file_ref.index), ("eu", 1));

        file.resolve(&file_ref, DatasetId::new("ds-2"));
        assert_eq!(
            file.spec.data_spec[0].dataset_groups["eu"],
            [DatasetId::new("ds-1"), DatasetId::new("ds-2")]
        );
    }

    #[test]
    fn run_directories_pick_up_spec_files_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let job = write(root, "job.json", r#"{"name": "j", "designId": "d"}"#);
        write(
            root,
            "dataSpec.json",
            r#"[{"role": "trainer", "datasetGroups": {"default": ["dataset1.json"]}}]"#,
        );
        write(root, "dataset1.json", DATASET);
        let file = load(&job, Some(root)).unwrap();
        assert_eq!(file.dataset_files.len(), 1);
        // Without the directory default nothing is picked up.
        assert!(load(&job, None).unwrap().spec.data_spec.is_empty());
    }

    #[test]
    fn bad_job_files_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let job = write(
            root,
            "job.json",
            r#"{"name": "j", "designId": "d", "dataSpecPath": "missing.json"}"#,
        );
        let text = load(&job, None).unwrap_err().to_string();
        assert!(text.contains("missing.json"), "{text}");

        write(
            root,
            "job.json",
            r#"{"name": "j", "designId": "d", "dataSpec": [{"role": "t", "datasetGroups": {}}],
                "dataSpecPath": "x.json"}"#,
        );
        let text = load(&job, None).unwrap_err().to_string();
        assert!(text.contains("both set"), "{text}");

        write(
            root,
            "job.json",
            r#"{"name": "j", "designId": "d", "dataSpec": [{"role": "t", "datasetGroups": {"g": ["bad.json"]}}]}"#,
        );
        write(root, "bad.json", r#"{"name": "x", "url": "u", "owner": "me"}"#);
        let text = load(&job, None).unwrap_err().to_string();
        assert!(text.contains("bad.json") && text.contains("owner: unknown field"), "{text}");
    }
}
