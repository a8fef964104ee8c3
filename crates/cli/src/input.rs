//! Reading the user's files: strict JSON (comment keys allowed, unknown fields named with their
//! path) and the error that makes `fledgectl` exit with the usage code 64.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use fledge_types::ErrorDetail;

/// Bad local input: a file that cannot be read or does not parse, or arguments that conflict.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is wrong; every problem with its field path.
    #[error("invalid {}:{}", path.display(), list(details))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        details: Vec<ErrorDetail>,
    },
    /// Anything else about the input (conflicting fields, missing files in a job directory).
    #[error("{0}")]
    Other(String),
}

fn list(details: &[ErrorDetail]) -> String {
    details
        .iter()
        .map(|d| {
            if d.path.is_empty() {
                format!("\n  - {}", d.message)
            } else {
                format!("\n  - {}: {}", d.path, d.message)
            }
        })
        .collect()
}

/// Reads a file's bytes.
pub fn read(path: &Path) -> Result<Vec<u8>, InputError> {
    std::fs::read(path).map_err(|source| InputError::Read { path: path.to_owned(), source })
}

/// Reads and strictly parses a JSON file (see `fledge_types::json::from_slice`).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, InputError> {
    let bytes = read(path)?;
    fledge_types::json::from_slice(&bytes)
        .map_err(|details| InputError::Invalid { path: path.to_owned(), details })
}

/// Reads a dataset file; a relative `file:` URL (`file:../data?shard=0`) is resolved against
/// the file's directory into an absolute one (`file:///abs/data?shard=0`), since the worker
/// that reads it does not know where the dataset file was.
pub fn read_dataset(path: &Path) -> Result<fledge_types::DatasetSpec, InputError> {
    let mut spec: fledge_types::DatasetSpec = read_json(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    spec.url = resolve_file_url(&spec.url, dir);
    Ok(spec)
}

/// `file:REL[?query]` → `file:///ABS[?query]` with `REL` taken relative to `dir`; any other URL
/// (absolute `file:///...`, `https://...`) is returned unchanged.
pub fn resolve_file_url(url: &str, dir: &Path) -> String {
    let Some(rest) = url.strip_prefix("file:") else {
        return url.to_owned();
    };
    if rest.starts_with('/') || rest.is_empty() {
        return url.to_owned();
    }
    let (rel, query) = match rest.find('?') {
        Some(pos) => rest.split_at(pos),
        None => (rest, ""),
    };
    let joined = dir.join(rel);
    let absolute =
        std::fs::canonicalize(&joined).or_else(|_| std::path::absolute(&joined)).unwrap_or(joined);
    format!("file://{}{query}", absolute.display())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn relative_file_urls_resolve_against_the_dataset_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(root.join("job")).unwrap();
        let job = root.join("job");
        assert_eq!(
            resolve_file_url("file:../data?shard=0&shards=4", &job),
            format!("file://{}/data?shard=0&shards=4", root.display())
        );
        assert_eq!(resolve_file_url("file:///abs/x.csv", &job), "file:///abs/x.csv");
        assert_eq!(resolve_file_url("https://h/x?y", &job), "https://h/x?y");
        let path = job.join("dataset.json");
        std::fs::write(&path, r#"{"name": "d", "url": "file:../data"}"#).unwrap();
        assert_eq!(read_dataset(&path).unwrap().url, format!("file://{}/data", root.display()));
    }

    #[test]
    fn errors_name_the_file_and_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dataset.json");
        std::fs::write(
            &path,
            r#"{"// note": "comment keys are fine", "name": "a", "url": "file:///x", "realm": "default", "colour": 1, "isPublik": true}"#,
        )
        .unwrap();
        let err = read_json::<fledge_types::DatasetSpec>(&path).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with(&format!("invalid {}:", path.display())), "{text}");
        assert!(text.contains("colour: unknown field"), "{text}");
        assert!(text.contains("isPublik: unknown field"), "{text}");

        std::fs::write(&path, "{\"name\": ").unwrap();
        let text = read_json::<fledge_types::DatasetSpec>(&path).unwrap_err().to_string();
        assert!(text.contains("malformed JSON at line 1"), "{text}");

        let missing = dir.path().join("nope.json");
        let err = read_json::<fledge_types::DatasetSpec>(&missing).unwrap_err();
        assert!(err.to_string().contains("nope.json"), "{err}");
    }
}
