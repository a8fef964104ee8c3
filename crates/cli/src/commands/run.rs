//! `run DIR`: registers a job directory and runs it.
//!
//! The directory holds `schema.json`, `job.json` (with `designId`), optionally `dataSpec.json`
//! and `modelSpec.json` (used when job.json names neither), `dataset*.json`, and
//! `code/<role>/...`. Every file is parsed before anything is sent. Then the design is created
//! if absent, a schema or code revision is uploaded only if it differs from the latest, datasets
//! are registered (reusing the user's identical ones), and a new job is created, started
//! and watched. Re-running creates a new job and nothing else.

use std::path::{Path, PathBuf};

use fledge_types::{DatasetSpec, DesignId, DesignSpec, Schema};

use super::Ctx;
use super::dataset::Registrar;
use super::watch;
use crate::args::RunArgs;
use crate::input::{self, InputError};
use crate::jobfile::{self, JobFile};
use crate::{bundle, output};

/// Everything read from a job directory before talking to the control plane.
#[derive(Debug)]
pub struct JobDir {
    /// schema.json.
    pub schema: Schema,
    /// job.json resolved.
    pub job: JobFile,
    /// `dataset*.json` files, sorted by name.
    pub datasets: Vec<(PathBuf, DatasetSpec)>,
    /// The zipped `code/` directory.
    pub code: Vec<u8>,
}

/// Reads and checks a job directory.
pub fn read_dir(dir: &Path) -> Result<JobDir, InputError> {
    if !dir.is_dir() {
        return Err(InputError::Other(format!("{} is not a directory", dir.display())));
    }
    let require = |name: &str| -> Result<PathBuf, InputError> {
        let path = dir.join(name);
        if path.exists() {
            Ok(path)
        } else {
            Err(InputError::Other(format!("{} has no {name}", dir.display())))
        }
    };
    let schema = input::read_json(&require("schema.json")?)?;
    let job = jobfile::load(&require("job.json")?, Some(dir))?;
    if job.spec.design_id.as_str().is_empty() {
        return Err(InputError::Other(format!(
            "{}: designId is required",
            dir.join("job.json").display()
        )));
    }
    let mut dataset_paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| InputError::Read { path: dir.to_owned(), source })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("dataset") && n.ends_with(".json"))
                && path.is_file()
        })
        .collect();
    dataset_paths.sort();
    let mut datasets = Vec::new();
    for path in dataset_paths {
        let spec = input::read_dataset(&path)?;
        datasets.push((path, spec));
    }
    let code = bundle::load(&require("code")?)?;
    Ok(JobDir { schema, job, datasets, code })
}

/// `run DIR`.
pub async fn run(ctx: &Ctx, args: &RunArgs) -> anyhow::Result<()> {
    let JobDir { schema, mut job, datasets, code } = read_dir(&args.dir)?;
    let client = &ctx.client;
    let design_id: DesignId = job.spec.design_id.clone();

    match client.get_design(&design_id).await {
        Ok(_) => eprintln!("design {design_id} exists"),
        Err(err) if err.is_not_found() => {
            let name =
                if schema.name.is_empty() { design_id.to_string() } else { schema.name.clone() };
            client
                .create_design(&DesignSpec {
                    id: design_id.clone(),
                    name,
                    description: schema.description.clone(),
                })
                .await?;
            eprintln!("created design {design_id}");
        }
        Err(err) => return Err(err.into()),
    }

    let latest_schema = match client.get_schema(&design_id).await {
        Ok(latest) => Some(latest),
        Err(err) if err.is_not_found() => None,
        Err(err) => return Err(err.into()),
    };
    let schema_version = match latest_schema {
        Some(latest) if latest.schema == schema && latest.version.is_some() => {
            let version = latest.version.unwrap_or_default();
            eprintln!("schema unchanged (version {version})");
            version
        }
        _ => {
            let version = client.create_schema(&design_id, &schema).await?;
            eprintln!("stored schema version {version}");
            version
        }
    };

    let latest_code = match client.get_code(&design_id).await {
        Ok(latest) => Some(latest),
        Err(err) if err.is_not_found() => None,
        Err(err) => return Err(err.into()),
    };
    let code_version = match latest_code {
        Some((Some(version), bytes)) if bundle::same_contents(&bytes, &code) => {
            eprintln!("code unchanged (version {version})");
            version
        }
        _ => {
            let revision = client.upload_code(&design_id, code.into()).await?;
            eprintln!("stored code version {}", revision.version);
            revision.version
        }
    };

    let mut registrar = Registrar::new(client);
    for (path, spec) in &datasets {
        registrar.ensure(spec, path).await?;
    }
    for file_ref in job.dataset_files.clone() {
        let id = registrar.ensure(&file_ref.spec, &file_ref.path).await?;
        job.resolve(&file_ref, id);
    }

    job.spec.schema_version.get_or_insert(schema_version);
    job.spec.code_version.get_or_insert(code_version);
    let created = client.create_job(&job.spec).await?;
    eprintln!("created job {} ({})", created.id, created.spec.name);
    let started = client.start_job(&created.id).await?;
    eprintln!("job {} is {}", started.id, started.state);
    let participant_run = schema.roles.iter().any(|role| role.participant_run)
        || job.spec.data_spec.iter().any(|entry| entry.participant_run);
    if participant_run {
        super::job::announce_join_commands(ctx, &started.id).await?;
    }
    if args.no_watch {
        return ctx.created_resource(&started, output::jobs);
    }
    let options = watch::Options { interval_ms: args.interval_ms, timeout: None };
    watch::watch_and_report(ctx, &started.id, options).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn job_directories_are_read_whole_or_rejected_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let err = read_dir(root).unwrap_err().to_string();
        assert!(err.contains("has no schema.json"), "{err}");

        std::fs::write(
            root.join("schema.json"),
            r#"{"roles": [{"name": "trainer", "isDataConsumer": true}], "channels": []}"#,
        )
        .unwrap();
        std::fs::write(root.join("job.json"), r#"{"name": "j", "designId": "d"}"#).unwrap();
        std::fs::write(
            root.join("dataSpec.json"),
            r#"[{"role": "trainer", "datasetGroups": {"default": ["dataset-b.json"]}}]"#,
        )
        .unwrap();
        for name in ["dataset-b.json", "dataset-a.json"] {
            std::fs::write(root.join(name), format!(r#"{{"name": "{name}", "url": "file:///x"}}"#))
                .unwrap();
        }
        let err = read_dir(root).unwrap_err().to_string();
        assert!(err.contains("has no code"), "{err}");

        std::fs::create_dir_all(root.join("code/trainer")).unwrap();
        std::fs::write(root.join("code/trainer/main.py"), "pass").unwrap();
        let job_dir = read_dir(root).unwrap();
        let names: Vec<&str> =
            job_dir.datasets.iter().map(|(_, spec)| spec.name.as_str()).collect();
        assert_eq!(names, ["dataset-a.json", "dataset-b.json"]);
        assert_eq!(job_dir.job.dataset_files.len(), 1);
        assert!(bundle::contents(&job_dir.code).unwrap().contains_key("trainer/main.py"));

        std::fs::write(root.join("schema.json"), r#"{"roles": [], "chanels": []}"#).unwrap();
        let err = read_dir(root).unwrap_err().to_string();
        assert!(err.contains("schema.json") && err.contains("chanels"), "{err}");
    }
}
