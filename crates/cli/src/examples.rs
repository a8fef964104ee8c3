//! Golden expansions of the job directories in `examples/`: every example is read the way
//! `fledgectl run DIR` reads it, validated and expanded as the control plane would, and its
//! task table is compared with `examples/<dir>/expansion.txt`. A change to an example's
//! schema, data spec or datasets therefore shows up as a reviewed diff of the tasks it becomes.
//!
//! Dataset files are given their file stem as id (`dataset-0`); the control plane assigns real
//! ids on registration, so task ids in `expansion.txt` differ from a live run's, the shape
//! does not. Rewrite after an intended change with
//! `UPDATE_EXPECT=1 cargo nextest run -p fledge-cli examples`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::path::{Path, PathBuf};

use fledge_types::{Dataset, DatasetId, JobId, UserId, expand, validate};

use crate::commands::run::{JobDir, read_dir};

/// The example folders that hold a job (`schema.json`), sorted by name.
fn job_examples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|err| panic!("read {}: {err}", root.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.join("schema.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// The expansion of one example directory, or every problem found on the way.
fn expansion(dir: &Path) -> Result<String, String> {
    let JobDir { schema, mut job, datasets, .. } = read_dir(dir).map_err(|e| e.to_string())?;
    let stem = |path: &Path| path.file_stem().and_then(|s| s.to_str()).unwrap_or("?").to_owned();
    let mut registered: Vec<Dataset> = datasets
        .iter()
        .map(|(path, spec)| Dataset {
            id: DatasetId::new(stem(path)),
            owner: UserId::new("example"),
            spec: spec.clone(),
        })
        .collect();
    for file_ref in job.dataset_files.clone() {
        let id = DatasetId::new(stem(&file_ref.path));
        if !registered.iter().any(|d| d.id == id) {
            registered.push(Dataset {
                id: id.clone(),
                owner: UserId::new("example"),
                spec: file_ref.spec.clone(),
            });
        }
        job.resolve(&file_ref, id);
    }
    let render = |stage: &str, problems: &[fledge_types::ErrorDetail]| {
        let lines: Vec<String> =
            problems.iter().map(|p| format!("  {}: {}", p.path, p.message)).collect();
        format!("{stage}:\n{}", lines.join("\n"))
    };
    let problems = validate::schema(&schema);
    if !problems.is_empty() {
        return Err(render("schema.json", &problems));
    }
    let lookup = |id: &DatasetId| registered.iter().find(|d| &d.id == id).cloned();
    let problems = validate::job(&job.spec, &schema, &lookup);
    if !problems.is_empty() {
        return Err(render("job.json", &problems));
    }
    let name = dir.file_name().and_then(|n| n.to_str()).expect("example folder name");
    let job_id = JobId::new(format!("example-{name}"));
    let tasks = expand::expand(&job_id, &job.spec, &schema, &registered, &[])
        .map_err(|problems| render("expansion", &problems))?;
    Ok(expand::table(&job_id, &tasks))
}

#[test]
fn every_example_expands_to_its_golden_task_table() {
    let examples = job_examples();
    assert!(examples.len() >= 5, "examples missing: {examples:?}");
    let mut failures = Vec::new();
    for dir in &examples {
        match expansion(dir) {
            Ok(table) => expect_test::expect_file![dir.join("expansion.txt")].assert_eq(&table),
            Err(problems) => failures.push(format!("{}: {problems}", dir.display())),
        }
    }
    assert!(failures.is_empty(), "examples that do not expand:\n{}", failures.join("\n"));
}
