//! Code bundles: a directory zipped on the fly (one folder per role), or a zip file as is, and
//! a content comparison so `run` uploads a new revision only when the code changed.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;

use crate::input::{self, InputError};

/// Directory names never put into a bundle (caches, VCS and build output).
pub const SKIPPED: &[&str] = &["__pycache__", ".git", "target"];

/// The zip bytes of `path`: a zip file read as is (after checking it is one), or a directory
/// zipped with deterministic order and timestamps.
pub fn load(path: &Path) -> Result<Vec<u8>, InputError> {
    let meta = std::fs::metadata(path)
        .map_err(|source| InputError::Read { path: path.to_owned(), source })?;
    if meta.is_dir() {
        return zip_dir(path);
    }
    let bytes = input::read(path)?;
    contents(&bytes).map_err(|message| InputError::Invalid {
        path: path.to_owned(),
        details: vec![fledge_types::ErrorDetail {
            path: String::new(),
            message: format!("not a zip file or a directory: {message}"),
        }],
    })?;
    Ok(bytes)
}

/// Zips the files under `dir` (paths relative to it), skipping [`SKIPPED`] directories.
pub fn zip_dir(dir: &Path) -> Result<Vec<u8>, InputError> {
    let mut files = Vec::new();
    collect(dir, "", &mut files)?;
    if files.is_empty() {
        return Err(InputError::Other(format!("{} holds no files to upload", dir.display())));
    }
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let zip_error =
        |err: zip::result::ZipError| InputError::Other(format!("cannot build the zip: {err}"));
    for (name, full) in files {
        let data = input::read(&full)?;
        let mut options = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .last_modified_time(zip::DateTime::default());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(&full) {
                options = options.unix_permissions(meta.permissions().mode() & 0o777);
            }
        }
        writer.start_file(name, options).map_err(zip_error)?;
        writer
            .write_all(&data)
            .map_err(|err| InputError::Other(format!("cannot build the zip: {err}")))?;
    }
    let cursor = writer.finish().map_err(zip_error)?;
    Ok(cursor.into_inner())
}

/// Files under `dir` in sorted order as (zip name, path on disk).
fn collect(
    dir: &Path,
    prefix: &str,
    out: &mut Vec<(String, std::path::PathBuf)>,
) -> Result<(), InputError> {
    let read_dir = |source| InputError::Read { path: dir.to_owned(), source };
    let mut entries = std::fs::read_dir(dir)
        .map_err(read_dir)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_dir)?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(InputError::Other(format!(
                "{} has a file name that is not UTF-8",
                entry.path().display()
            )));
        };
        let path = entry.path();
        let file_type =
            entry.file_type().map_err(|source| InputError::Read { path: path.clone(), source })?;
        let zip_name = format!("{prefix}{name}");
        if file_type.is_dir() {
            if !SKIPPED.contains(&name) {
                collect(&path, &format!("{zip_name}/"), out)?;
            }
        } else if file_type.is_symlink() {
            // Follow links to files; links to directories could loop, so they are skipped.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => out.push((zip_name, path)),
                _ => {
                    tracing::warn!(path = %path.display(), "skipping a symlink that is not a file")
                }
            }
        } else if file_type.is_file() {
            out.push((zip_name, path));
        }
    }
    Ok(())
}

/// The files of a zip: name → bytes (directory entries left out).
pub fn contents(zip: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut archive = zip::ZipArchive::new(Cursor::new(zip)).map_err(|e| e.to_string())?;
    let mut res = BTreeMap::new();
    for index in 0..archive.len() {
        let mut file = archive.by_index(index).map_err(|e| e.to_string())?;
        if file.is_dir() {
            continue;
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(|e| e.to_string())?;
        res.insert(file.name().trim_start_matches("./").to_owned(), data);
    }
    Ok(res)
}

/// Whether two bundles hold the same files with the same bytes.
pub fn same_contents(a: &[u8], b: &[u8]) -> bool {
    match (contents(a), contents(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn directories_zip_deterministically_without_caches() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "trainer/main.py", "print('train')");
        write(root, "trainer/lib/util.py", "X = 1");
        write(root, "trainer/__pycache__/main.cpython-312.pyc", "junk");
        write(root, "aggregator/fledge-role.toml", "builtin = \"top-aggregator\"");
        write(root, ".git/HEAD", "ref");
        write(root, "aggregator/target/debug/x", "bin");

        let zip = load(root).unwrap();
        let files = contents(&zip).unwrap();
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["aggregator/fledge-role.toml", "trainer/lib/util.py", "trainer/main.py"]
        );
        assert_eq!(files["trainer/main.py"], b"print('train')");
        // Same tree, same bytes: uploads can be compared.
        assert_eq!(load(root).unwrap(), zip);

        // A zip file is taken as is.
        let zip_path = root.join("code.zip");
        std::fs::write(&zip_path, &zip).unwrap();
        assert!(same_contents(&load(&zip_path).unwrap(), &zip));

        write(root, "trainer/main.py", "print('changed')");
        assert!(!same_contents(&load(root).unwrap(), &zip));
    }

    #[test]
    fn bad_paths_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let not_zip = dir.path().join("code.zip");
        std::fs::write(&not_zip, "hello").unwrap();
        let text = load(&not_zip).unwrap_err().to_string();
        assert!(text.contains("code.zip") && text.contains("not a zip"), "{text}");

        let missing = dir.path().join("missing");
        assert!(load(&missing).unwrap_err().to_string().contains("missing"));

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(load(&empty).unwrap_err().to_string().contains("no files"));
    }
}
