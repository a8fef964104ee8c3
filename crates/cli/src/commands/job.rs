//! Jobs: `create|get|update|remove job`, `get jobs|tasks|task|metrics|status`, `start|stop job`,
//! `job plan`, `job join`.

use std::collections::BTreeMap;
use std::path::Path;

use fledge_types::{JobId, JobState, MetricRecord, TaskId};

use super::Ctx;
use super::dataset::Registrar;
use crate::input::InputError;
use crate::jobfile::{self, JobFile};
use crate::output;

/// Reads job.json and registers the dataset files it names (reusing identical datasets).
pub async fn load_and_register(
    ctx: &Ctx,
    file: &Path,
    defaults_dir: Option<&Path>,
) -> anyhow::Result<JobFile> {
    let mut job_file = jobfile::load(file, defaults_dir)?;
    let mut registrar = Registrar::new(&ctx.client);
    for file_ref in job_file.dataset_files.clone() {
        let id = registrar.ensure(&file_ref.spec, &file_ref.path).await?;
        job_file.resolve(&file_ref, id);
    }
    Ok(job_file)
}

/// `create job FILE`.
pub async fn create(ctx: &Ctx, file: &Path) -> anyhow::Result<()> {
    let job_file = load_and_register(ctx, file, None).await?;
    let job = ctx.client.create_job(&job_file.spec).await?;
    eprintln!("created job {} ({})", job.id, job.spec.name);
    ctx.created_resource(&job, output::jobs)
}

/// `update job ID FILE`.
pub async fn update(ctx: &Ctx, id: &str, file: &Path) -> anyhow::Result<()> {
    let job_file = load_and_register(ctx, file, None).await?;
    let job = ctx.client.update_job(&JobId::new(id), &job_file.spec).await?;
    eprintln!("updated job {}", job.id);
    ctx.created_resource(&job, output::jobs)
}

/// `job plan FILE`: prints the expansion; creates nothing (dataset files must be registered).
pub async fn plan(ctx: &Ctx, file: &Path) -> anyhow::Result<()> {
    let mut job_file = jobfile::load(file, None)?;
    let mut registrar = Registrar::new(&ctx.client);
    for file_ref in job_file.dataset_files.clone() {
        match registrar.lookup(&file_ref.spec, &file_ref.path).await? {
            Some(id) => job_file.resolve(&file_ref, id),
            None => {
                return Err(InputError::Other(format!(
                    "dataset file {} ({:?}) is not registered yet; `job plan` creates nothing, so register it first (`fledgectl create dataset {}`)",
                    file_ref.path.display(),
                    file_ref.spec.name,
                    file_ref.path.display()
                ))
                .into());
            }
        }
    }
    let tasks = ctx.client.plan_job(&job_file.spec).await?;
    eprintln!(
        "job {:?} expands to {} tasks ({})",
        job_file.spec.clone().with_defaults().name,
        tasks.len(),
        output::role_counts(&tasks)
    );
    ctx.show(&tasks, || output::plan(&tasks))
}

/// Mints a key for each participant-run task of `info` that has none yet or is named in
/// `remint`, and for no other; returns the keys (shown once).
async fn mint_keys(
    ctx: &Ctx,
    job: &JobId,
    info: &fledge_client::JoinInfo,
    remint: &[TaskId],
) -> anyhow::Result<BTreeMap<TaskId, String>> {
    for task in remint {
        if !info.tasks.iter().any(|t| &t.task_id == task) {
            anyhow::bail!("task {task} is not a participant-run task of job {job}");
        }
    }
    let mut minted = BTreeMap::new();
    for task in &info.tasks {
        let fresh = !info.keyed.contains(&task.task_id) && !task.state.is_final();
        if fresh || remint.contains(&task.task_id) {
            let key = ctx.client.mint_task_key(job, &task.task_id).await?;
            minted.insert(task.task_id.clone(), key.key);
        }
    }
    Ok(minted)
}

/// `job join ID [--remint TASK]...`: mints the key of each participant-run task that has none
/// (and of the tasks named by `--remint`, replacing theirs) and prints the command each data
/// owner runs.
pub async fn join(ctx: &Ctx, id: &str, remint: &[String]) -> anyhow::Result<()> {
    let job = JobId::new(id);
    let info = ctx.client.join_info(&job).await?;
    let remint: Vec<TaskId> = remint.iter().map(TaskId::new).collect();
    let minted = mint_keys(ctx, &job, &info, &remint).await?;
    let commands = output::join_commands(&info, ctx.client.endpoint(), &minted);
    if commands.is_empty() {
        let state = ctx.client.get_job(&job).await?.state;
        if state == JobState::Ready || state == JobState::Starting {
            eprintln!("job {id} is {state}: its tasks exist once it has started");
        } else {
            eprintln!("job {id} has no participant-run tasks: the platform runs all of them");
        }
    } else {
        eprintln!("{}", output::JOIN_TIP);
    }
    ctx.show(&commands, || output::join_table(&commands))
}

/// Prints the join commands of `job`'s participant-run tasks on stderr, if it has any; waits
/// (briefly) for the controller to expand a job that has just started.
pub async fn announce_join_commands(ctx: &Ctx, job: &JobId) -> anyhow::Result<()> {
    for _ in 0..100 {
        // The state first: once it is past `starting`, the tasks listed next are all there.
        let state = ctx.client.get_job(job).await?.state;
        let info = ctx.client.join_info(job).await?;
        if !info.tasks.is_empty() {
            let minted = mint_keys(ctx, job, &info, &[]).await?;
            let commands = output::join_commands(&info, ctx.client.endpoint(), &minted);
            eprintln!(
                "job {job} has {} participant-run task(s); it starts once their data owners have joined.",
                commands.len()
            );
            eprintln!("{}", output::JOIN_TIP);
            eprint!("{}", output::join_table(&commands));
            eprintln!("(`fledgectl job join {job}` prints these commands again)");
            return Ok(());
        }
        if state != JobState::Starting {
            // Expanded (no participant-run task) or ended.
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `job revoke-key JOB TASK`: withdraws a participant-run task's key; its agent is refused from
/// its next call on, until `job join JOB --remint TASK` mints another.
pub async fn revoke_key(ctx: &Ctx, id: &str, task: &str) -> anyhow::Result<()> {
    ctx.client.revoke_task_key(&JobId::new(id), &TaskId::new(task)).await?;
    eprintln!(
        "revoked the key of task {task}; `fledgectl job join {id} --remint {task}` mints another"
    );
    Ok(())
}

/// `get job ID`.
pub async fn get(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let job = ctx.client.get_job(&JobId::new(id)).await?;
    ctx.resource(&job, output::jobs)
}

/// `get jobs [--state S]`.
pub async fn list(ctx: &Ctx, state: Option<&str>) -> anyhow::Result<()> {
    let state = state
        .map(|s| s.parse::<JobState>())
        .transpose()
        .map_err(|err| InputError::Other(format!("--state: {err}")))?;
    let jobs = ctx.client.list_jobs(state).await?;
    ctx.resources(&jobs, output::jobs)
}

/// `remove job ID`.
pub async fn remove(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    ctx.client.delete_job(&JobId::new(id)).await?;
    eprintln!("removed job {id}");
    Ok(())
}

/// `start job ID`.
pub async fn start(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let job = ctx.client.start_job(&JobId::new(id)).await?;
    eprintln!("job {} is {}", job.id, job.state);
    ctx.created_resource(&job, output::jobs)
}

/// `stop job ID`.
pub async fn stop(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let job = ctx.client.stop_job(&JobId::new(id)).await?;
    eprintln!("job {} is {}", job.id, job.state);
    ctx.created_resource(&job, output::jobs)
}

/// `get status JOB`.
pub async fn status(ctx: &Ctx, job: &str) -> anyhow::Result<()> {
    let status = ctx.client.job_status(&JobId::new(job)).await?;
    ctx.show(&status, || output::status(&status))
}

/// `get tasks JOB`.
pub async fn tasks(ctx: &Ctx, job: &str) -> anyhow::Result<()> {
    let tasks = ctx.client.list_tasks(&JobId::new(job)).await?;
    ctx.resources(&tasks, output::tasks)
}

/// `get models JOB`.
pub async fn models(ctx: &Ctx, job: &str) -> anyhow::Result<()> {
    let files = ctx.client.list_models(&JobId::new(job)).await?;
    ctx.show(&files, || output::models(&files))
}

/// `get model JOB [--round R] [--group G] [-f FILE]`.
pub async fn model(
    ctx: &Ctx,
    job: &str,
    round: Option<u64>,
    group: Option<&str>,
    file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let bytes = ctx.client.get_model(&JobId::new(job), round, group).await?;
    let file = file.unwrap_or_else(|| {
        let group = group.map(|g| format!("-{g}")).unwrap_or_default();
        match round {
            Some(round) => format!("{job}{group}-round-{round}.safetensors").into(),
            None => format!("{job}{group}-final.safetensors").into(),
        }
    });
    std::fs::write(&file, &bytes)
        .map_err(|err| anyhow::anyhow!("cannot write {}: {err}", file.display()))?;
    eprintln!("wrote {} bytes to {}", bytes.len(), file.display());
    output::emit(&file.display().to_string())?;
    Ok(())
}

/// `get task JOB TASK`.
pub async fn task(ctx: &Ctx, job: &str, task: &str) -> anyhow::Result<()> {
    let task = ctx.client.get_task(&JobId::new(job), &TaskId::new(task)).await?;
    ctx.resource(&task, output::tasks)
}

/// Which metric records and names `get metrics` shows.
#[derive(Debug, Default)]
pub struct MetricFilter {
    /// Only this role's records.
    pub role: Option<String>,
    /// Only this round's records.
    pub round: Option<u64>,
    /// Only these metric names (all when empty); records left with none are dropped.
    pub names: Vec<String>,
}

impl MetricFilter {
    /// Applies the filter.
    pub fn apply(&self, records: Vec<MetricRecord>) -> Vec<MetricRecord> {
        records
            .into_iter()
            .filter(|r| self.role.as_ref().is_none_or(|role| r.role == *role))
            .filter(|r| self.round.is_none_or(|round| r.round == round))
            .filter_map(|mut r| {
                if !self.names.is_empty() {
                    r.metrics.retain(|name, _| self.names.contains(name));
                    if r.metrics.is_empty() {
                        return None;
                    }
                }
                Some(r)
            })
            .collect()
    }
}

/// `get metrics JOB [--role R] [--round N] [--names a,b]`.
pub async fn metrics(ctx: &Ctx, job: &str, filter: &MetricFilter) -> anyhow::Result<()> {
    let records = filter.apply(ctx.client.job_metrics(&JobId::new(job)).await?);
    let wide = ctx.format == Some(crate::args::Format::Wide);
    if ctx.format.is_none() {
        let hidden: std::collections::BTreeSet<&str> = records
            .iter()
            .flat_map(|r| r.metrics.keys().map(String::as_str))
            .filter(|name| output::is_channel_metric(name))
            .collect();
        if !hidden.is_empty() {
            eprintln!("({} per-channel columns left out; -o wide shows them)", hidden.len());
        }
    }
    ctx.show(&records, || output::metrics(&records, wide))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn record(role: &str, round: u64, names: &[&str]) -> MetricRecord {
        MetricRecord {
            task_id: TaskId::new(format!("{role}-{round}")),
            role: role.to_owned(),
            round,
            metrics: names.iter().map(|n| ((*n).to_owned(), 1.0)).collect::<BTreeMap<_, _>>(),
            timestamp: None,
        }
    }

    #[test]
    fn metric_filters_combine() {
        let records = vec![
            record("trainer", 1, &["loss", "bytesSent"]),
            record("trainer", 2, &["loss"]),
            record("aggregator", 2, &["updates"]),
        ];
        let all = MetricFilter::default().apply(records.clone());
        assert_eq!(all, records);
        let filter = MetricFilter { names: vec!["loss".into()], ..Default::default() };
        let loss = filter.apply(records.clone());
        assert_eq!(loss.len(), 2);
        assert!(loss.iter().all(|r| r.metrics.keys().eq(["loss"])));
        let filter = MetricFilter { role: Some("trainer".into()), round: Some(2), names: vec![] };
        assert_eq!(filter.apply(records), vec![record("trainer", 2, &["loss"])]);
    }
}
