//! Code bundles: a directory zipped on the fly (one folder per role), or a zip file as is, and
//! a content comparison so `run` uploads a new revision only when the code changed.
//!
//! The directory walk (the `ignore` crate) honours `.gitignore` files (in the directory, below
//! it and in its parents, whether or not it is in a git repository), `.git/info/exclude` and
//! `.ignore` files, and skips caches, VCS and build output ([`SKIPPED`]) and Python virtual
//! environments (a directory holding `pyvenv.cfg`, or `conda-meta/` for conda), so a role folder
//! with a `.venv` uploads only its code.

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

/// Zips the files under `dir` (paths relative to it) that the walk keeps (see the module doc).
pub fn zip_dir(dir: &Path) -> Result<Vec<u8>, InputError> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
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

/// Whether `dir` is a Python virtual environment (venv/virtualenv write `pyvenv.cfg`, conda
/// environments hold `conda-meta/`).
fn is_virtual_env(dir: &Path) -> bool {
    dir.join("pyvenv.cfg").is_file() || dir.join("conda-meta").is_dir()
}

/// Files under `dir` in sorted order as (zip name, path on disk).
fn collect(dir: &Path, out: &mut Vec<(String, std::path::PathBuf)>) -> Result<(), InputError> {
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .parents(true)
        .ignore(true)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .require_git(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|entry| {
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            let skipped = entry.depth() > 0
                && is_dir
                && (entry.file_name().to_str().is_some_and(|name| SKIPPED.contains(&name))
                    || is_virtual_env(entry.path()));
            if skipped {
                tracing::debug!(path = %entry.path().display(), "left out of the bundle");
            }
            !skipped
        })
        .build();
    for entry in walk {
        let entry = entry.map_err(|err| {
            InputError::Other(format!("cannot read {} for the bundle: {err}", dir.display()))
        })?;
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path().to_owned();
        let rel = path.strip_prefix(dir).map_err(|_| {
            InputError::Other(format!("{} is outside {}", path.display(), dir.display()))
        })?;
        let Some(zip_name) = rel.to_str().map(|name| name.replace(std::path::MAIN_SEPARATOR, "/"))
        else {
            return Err(InputError::Other(format!(
                "{} has a file name that is not UTF-8",
                path.display()
            )));
        };
        let Some(file_type) = entry.file_type() else { continue };
        if file_type.is_symlink() {
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
    // The walk sorts siblings by name; zip names sort the same way, so order is deterministic.
    out.sort();
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
    fn gitignored_files_and_virtual_environments_stay_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, ".gitignore", "*.log\n/trainer/data/\n");
        write(root, "trainer/main.py", "print('train')");
        write(root, "trainer/run.log", "noise");
        write(root, "trainer/data/big.npz", "weights");
        write(root, "trainer/.gitignore", "secrets.txt\n");
        write(root, "trainer/secrets.txt", "key");
        write(root, "trainer/.venv/pyvenv.cfg", "home = /usr/bin");
        write(root, "trainer/.venv/lib/site.py", "x");
        write(root, "trainer/env2/pyvenv.cfg", "home = /usr/bin");
        write(root, "trainer/env2/bin/python", "x");
        write(root, "trainer/conda/conda-meta/history", "x");
        write(root, "trainer/conda/bin/python", "x");
        write(root, "trainer/venv_notes/readme.txt", "kept: not an environment");

        let names: Vec<String> = contents(&load(root).unwrap()).unwrap().into_keys().collect();
        assert_eq!(
            names,
            [
                ".gitignore",
                "trainer/.gitignore",
                "trainer/main.py",
                "trainer/venv_notes/readme.txt"
            ]
        );
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
