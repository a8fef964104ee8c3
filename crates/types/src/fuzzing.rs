//! Fuzz target body (not part of the API): the `fuzz/` crate's `spec` target calls [`spec`],
//! and this crate's `fuzz_corpus` test replays every file of its committed corpus through it,
//! so a regression fails the normal test run. It must not panic on any input.

use crate::job::{Job, JobSpec, RegistrySpec};
use crate::resources::{Compute, ComputeSpec, Dataset, DatasetSpec, DesignSpec};
use crate::schema::Schema;
use crate::state::JobState;
use crate::task_config::{BrokerSpec, TaskEnv};
use crate::{JobId, UserId, expand, json, task_config, validate};

/// Separates the documents of one input.
pub const SEPARATOR: u8 = 0;

/// Spec parsing, validation and expansion as the control plane runs them on a submission.
///
/// The input is up to five documents separated by [`SEPARATOR`] bytes: a schema, a job spec,
/// the datasets (a JSON array of dataset records), the computes (an array of compute records)
/// and one more document that is parsed as each of the other specs users submit (dataset,
/// compute and design specs). When schema and job parse, they are validated; a valid job is
/// expanded and every task's config is built. Expansion must be deterministic.
pub fn spec(data: &[u8]) {
    let mut parts = data.split(|&b| b == SEPARATOR);
    let mut next = || parts.next().unwrap_or(&[]);
    let (schema, job, datasets, computes, other) = (next(), next(), next(), next(), next());
    let _ = json::from_slice::<DatasetSpec>(other);
    let _ = json::from_slice::<ComputeSpec>(other);
    let _ = json::from_slice::<DesignSpec>(other);
    let _ = json::from_slice_lenient::<JobSpec>(other);

    let Ok(schema) = json::from_slice::<Schema>(schema) else { return };
    let schema_problems = validate::schema(&schema);
    let Ok(job) = json::from_slice::<JobSpec>(job).map(JobSpec::with_defaults) else { return };
    let datasets: Vec<Dataset> = json::from_slice(datasets).unwrap_or_default();
    let computes: Vec<Compute> = json::from_slice(computes).unwrap_or_default();
    let lookup = |id: &crate::DatasetId| datasets.iter().find(|d| &d.id == id).cloned();
    let problems = validate::job(&job, &schema, &lookup);
    if !schema_problems.is_empty() {
        assert!(!problems.is_empty(), "a job on an invalid schema validated: {schema_problems:?}");
        return;
    }
    if !problems.is_empty() {
        return;
    }
    let job_id = JobId::new("job-fuzz");
    let tasks = match expand::expand(&job_id, &job, &schema, &datasets, &computes) {
        Ok(tasks) => tasks,
        // Validation expands as a check, so a valid job expands.
        Err(problems) => panic!("a valid job does not expand: {problems:?}"),
    };
    let again = expand::expand(&job_id, &job, &schema, &datasets, &computes);
    assert_eq!(again.as_ref(), Ok(&tasks), "expansion is not deterministic");
    let _ = expand::table(&job_id, &tasks);
    let job = Job {
        id: job_id,
        owner: UserId::new("fuzz"),
        spec: job,
        schema_version: "1".to_owned(),
        code_version: "1".to_owned(),
        state: JobState::Starting,
        reason: None,
        created_at: chrono::DateTime::UNIX_EPOCH,
        started_at: None,
        updated_at: chrono::DateTime::UNIX_EPOCH,
        ended_at: None,
    };
    let env = TaskEnv {
        brokers: vec![BrokerSpec::mqtt("broker:1883")],
        apiserver: Some("https://127.0.0.1:10100".to_owned()),
        metaserver: None,
        default_registry: RegistrySpec { sort: "local".to_owned(), uri: "/registry".to_owned() },
    };
    for task in &tasks {
        let dataset = task.dataset_id.as_ref().and_then(lookup);
        let config = task_config::build(&job, &schema, task, dataset.as_ref(), &env);
        serde_json::to_vec(&config).expect("a task config serializes");
    }
}

/// Replays the committed corpus of fuzz target `target` (every file under
/// `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` of the repository) through `body`,
/// the function the target calls. Panics naming every input that panicked, or when the corpus
/// is missing or empty (so a moved corpus cannot turn the replay into a no-op).
pub fn replay(target: &str, body: fn(&[u8])) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let dir = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        files.extend(entries.map(|e| e.expect("corpus directory entry").path()));
    }
    files.sort();
    assert!(!files.is_empty(), "no corpus for fuzz target {target} under {}", root.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: inputs that panic: {failed:#?}");
}
