//! Data-driven golden tests of parsing, validation and expansion.
//!
//! - `tests/golden/<case>/` holds a valid design (`schema.json`), a job (`job.json`, with its
//!   data and model specs inline), its datasets (`datasets.json`) and optionally the registered
//!   computes (`computes.json`); `expected.txt` is the expansion as a table.
//! - `tests/invalid/<case>/` holds the same files with mistakes; `expected.txt` lists every
//!   problem reported (`path: message`), or the expansion when the input is valid (comment keys).
//!
//! Run with `UPDATE_EXPECT=1` to rewrite the expected files after an intended change.

use std::fs;
use std::path::{Path, PathBuf};

use expect_test::expect_file;
use fledge_types::{Compute, Dataset, ErrorDetail, JobId, JobSpec, Schema, expand, json, validate};

#[test]
fn golden_expansions() {
    let cases = case_dirs("golden");
    assert!(cases.len() >= 11, "golden cases missing: {cases:?}");
    for dir in cases {
        let report = run_case(&dir);
        assert!(
            report.starts_with("job "),
            "{}: a golden case must be valid:\n{report}",
            dir.display()
        );
        expect_file![dir.join("expected.txt")].assert_eq(&report);
    }
}

#[test]
fn invalid_inputs() {
    for dir in case_dirs("invalid") {
        let report = run_case(&dir);
        expect_file![dir.join("expected.txt")].assert_eq(&report);
    }
}

/// The case folders under `tests/<kind>/`, sorted by name.
fn case_dirs(kind: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(kind);
    let mut res: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|err| panic!("read {}: {err}", root.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_dir())
        .collect();
    res.sort();
    res
}

/// Parses, validates and expands one case; renders problems or the expansion.
fn run_case(dir: &Path) -> String {
    let mut out = String::new();
    let schema = parse::<Schema>(dir, "schema.json", &mut out);
    // As the apiserver does: a job without a name is named after its design.
    let job = parse_optional::<JobSpec>(dir, "job.json", &mut out).map(JobSpec::with_defaults);
    let datasets = parse_optional::<Vec<Dataset>>(dir, "datasets.json", &mut out);
    let computes = parse_optional::<Vec<Compute>>(dir, "computes.json", &mut out);
    if !out.is_empty() {
        return out;
    }
    let schema = schema.expect("parsed without errors");
    let Some(job) = job else {
        let problems = validate::schema(&schema);
        if problems.is_empty() {
            return "schema valid\n".to_owned();
        }
        render_errors(&mut out, "schema validation", &problems);
        return out;
    };
    let datasets = datasets.unwrap_or_default();
    let computes = computes.unwrap_or_default();
    let lookup = |id: &fledge_types::DatasetId| datasets.iter().find(|d| &d.id == id).cloned();
    let problems = validate::job(&job, &schema, &lookup);
    if !problems.is_empty() {
        render_errors(&mut out, "validation", &problems);
        return out;
    }
    let case = dir.file_name().and_then(|n| n.to_str()).expect("case folder name");
    let job_id = JobId::new(format!("job-{case}"));
    match expand::expand(&job_id, &job, &schema, &datasets, &computes) {
        Ok(tasks) => out.push_str(&expand::table(&job_id, &tasks)),
        Err(problems) => render_errors(&mut out, "expansion", &problems),
    }
    out
}

fn parse<T: serde::de::DeserializeOwned>(dir: &Path, file: &str, out: &mut String) -> Option<T> {
    let path = dir.join(file);
    let bytes = fs::read(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    match json::from_slice::<T>(&bytes) {
        Ok(value) => Some(value),
        Err(problems) => {
            render_errors(out, &format!("parse {file}"), &problems);
            None
        }
    }
}

/// Like [`parse`] for a file a case may omit (`None` when absent or unparsable).
fn parse_optional<T: serde::de::DeserializeOwned>(
    dir: &Path,
    file: &str,
    out: &mut String,
) -> Option<T> {
    if dir.join(file).exists() { parse(dir, file, out) } else { None }
}

fn render_errors(out: &mut String, stage: &str, problems: &[ErrorDetail]) {
    out.push_str(&format!("{stage}: {} error(s)\n", problems.len()));
    for problem in problems {
        if problem.path.is_empty() {
            out.push_str(&format!("  {}\n", problem.message));
        } else {
            out.push_str(&format!("  {}: {}\n", problem.path, problem.message));
        }
    }
}
