//! `describe job ID` and `describe task JOB TASK`: one resource in detail, in kubectl's
//! sectioned text, from the endpoints `get` uses (job, status, tasks, metrics, models).
//! `-o json|yaml` prints the same facts as one document; `-o name` the `KIND/ID`.
//!
//! Gathering is async ([`job`], [`task`]); rendering is pure ([`job_text`], [`task_text`]), so
//! it is tested against fixed data and a fixed "now".

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use fledge_client::JobStatus;
use fledge_types::{Job, JobId, MetricRecord, ModelFile, Task, TaskId, TaskState};

use super::Ctx;
use super::watch::{self, summarize, total_rounds};
use crate::args::Format;
use crate::output::{self, Named as _, age, format_metric};

/// Lines of a failed task's log shown under "Problems", and of a task's log by `describe task`.
const LOG_LINES: usize = 10;
/// Most metric values listed under "Latest metrics".
const MAX_METRICS: usize = 24;

/// What `describe job` knows, as `-o json|yaml` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobDescription {
    /// The job.
    pub job: Job,
    /// Its status (task counts).
    pub status: JobStatus,
    /// Its tasks.
    pub tasks: Vec<Task>,
    /// Its model files in the platform's registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelFile>>,
    /// Why they cannot be listed (e.g. the job's registry is MLflow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models_error: Option<String>,
    /// Its metric records.
    pub metrics: Vec<MetricRecord>,
}

/// `describe job ID`.
pub async fn job(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let id = JobId::new(id);
    let job = ctx.client.get_job(&id).await?;
    if ctx.format == Some(Format::Name) {
        return Ok(output::emit(&format!("job/{}", job.id()))?);
    }
    let status = ctx.client.job_status(&id).await?;
    let mut tasks = ctx.client.list_tasks(&id).await?;
    // The listing may leave logs out; a failed task's own record has its tail.
    for task in tasks.iter_mut().filter(|t| t.state == TaskState::Failed && t.log.is_empty()) {
        if let Ok(full) = ctx.client.get_task(&id, &task.task_id).await {
            task.log = full.log;
        }
    }
    let (models, models_error) = match ctx.client.list_models(&id).await {
        Ok(models) => (Some(models), None),
        Err(err) => (None, Some(err.to_string())),
    };
    let metrics = ctx.client.job_metrics(&id).await?;
    let description = JobDescription { job, status, tasks, models, models_error, metrics };
    ctx.show(&description, || job_text(&description, Utc::now()))
}

/// `describe task JOB TASK`.
pub async fn task(ctx: &Ctx, job: &str, task: &str) -> anyhow::Result<()> {
    let job = JobId::new(job);
    let task = ctx.client.get_task(&job, &TaskId::new(task)).await?;
    if ctx.format == Some(Format::Name) {
        return Ok(output::emit(&format!("task/{}", task.id()))?);
    }
    let metrics: Vec<MetricRecord> = ctx
        .client
        .job_metrics(&job)
        .await?
        .into_iter()
        .filter(|r| r.task_id == task.task_id)
        .collect();
    let description = TaskDescription { task, metrics };
    ctx.show(&description, || task_text(&description, Utc::now()))
}

/// What `describe task` knows, as `-o json|yaml` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskDescription {
    /// The task (with its log tail).
    pub task: Task,
    /// Its own metric records.
    pub metrics: Vec<MetricRecord>,
}

fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => format!("{} ({} ago)", t.format("%Y-%m-%d %H:%M:%S UTC"), age(t, now)),
        None => "-".to_owned(),
    }
}

fn field(out: &mut String, indent: usize, name: &str, value: impl std::fmt::Display) {
    let label = format!("{name}:");
    let _ = writeln!(out, "{:indent$}{label:<18}{value}", "");
}

fn indented(out: &mut String, text: &str, indent: usize) {
    for line in text.lines() {
        let _ = writeln!(out, "{:indent$}{line}", "");
    }
}

/// `a=1, b=x` of a JSON map, `-` when empty.
fn pairs(map: &serde_json::Map<String, serde_json::Value>) -> String {
    if map.is_empty() {
        return "-".to_owned();
    }
    map.iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn last_lines(log: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = log.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The latest record's metrics of each role, at most [`MAX_METRICS`] names, per-channel
/// counters left out.
fn latest_by_role(metrics: &[MetricRecord]) -> BTreeMap<&str, (u64, BTreeMap<&str, f64>)> {
    let mut latest: BTreeMap<&str, (u64, BTreeMap<&str, f64>)> = BTreeMap::new();
    for record in metrics {
        let entry = latest.entry(record.role.as_str()).or_insert((record.round, BTreeMap::new()));
        if record.round > entry.0 {
            *entry = (record.round, BTreeMap::new());
        }
        if record.round == entry.0 {
            for (name, value) in &record.metrics {
                if !output::is_channel_metric(name) {
                    entry.1.insert(name.as_str(), *value);
                }
            }
        }
    }
    latest
}

/// The text of `describe job`.
pub fn job_text(d: &JobDescription, now: DateTime<Utc>) -> String {
    let job = &d.job;
    let spec = &job.spec;
    let mut out = String::new();
    field(&mut out, 0, "Name", &spec.name);
    field(&mut out, 0, "ID", &job.id);
    field(&mut out, 0, "Owner", &job.owner);
    field(
        &mut out,
        0,
        "Design",
        format!("{} (schema {}, code {})", spec.design_id, job.schema_version, job.code_version),
    );
    field(&mut out, 0, "State", job.state);
    field(&mut out, 0, "Reason", job.reason.as_deref().unwrap_or("-"));
    field(&mut out, 0, "Created", when(Some(job.created_at), now));
    field(&mut out, 0, "Started", when(job.started_at, now));
    field(&mut out, 0, "Ended", when(job.ended_at, now));
    if let Some(started) = job.started_at {
        let end = job.ended_at.unwrap_or(now);
        field(&mut out, 0, "Running for", age(started, end));
    }

    out.push_str("Spec:\n");
    field(&mut out, 2, "Backend", spec.backend);
    let priority = serde_json::to_value(spec.priority)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    field(&mut out, 2, "Priority", priority);
    let max_run_time = match spec.max_run_time {
        0 => "none".to_owned(),
        secs => watch::humanize(std::time::Duration::from_secs(secs)),
    };
    field(&mut out, 2, "Max run time", max_run_time);
    let model = &spec.model_spec;
    field(&mut out, 2, "Optimizer", &model.optimizer.sort);
    field(&mut out, 2, "Selector", &model.selector.sort);
    field(&mut out, 2, "Hyperparameters", pairs(&model.hyperparameters));
    if !model.base_model.name.is_empty() {
        field(
            &mut out,
            2,
            "Base model",
            format!("{} version {}", model.base_model.name, model.base_model.version),
        );
    }
    let privacy: Vec<&str> = [
        (model.secure_aggregation.is_some(), "secure aggregation"),
        (model.differential_privacy.is_some(), "differential privacy"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if !privacy.is_empty() {
        field(&mut out, 2, "Privacy", format!("{} (see -o yaml)", privacy.join(", ")));
    }
    for entry in &spec.data_spec {
        let groups = entry
            .dataset_groups
            .iter()
            .map(|(group, ids)| format!("{group}: {}", ids.len()))
            .collect::<Vec<_>>()
            .join(", ");
        let run = if entry.participant_run { ", participant-run" } else { "" };
        field(&mut out, 2, "Data", format!("{} datasets ({groups}){run}", entry.role));
    }

    out.push_str("Registry:\n");
    match model.registry.uri.as_str() {
        "" => field(&mut out, 2, "Sort", &model.registry.sort),
        uri => field(&mut out, 2, "Sort", format!("{} at {uri}", model.registry.sort)),
    }
    match (&d.models, &d.models_error) {
        (Some(files), _) if files.is_empty() => field(&mut out, 2, "Models", "none yet"),
        (Some(files), _) => {
            let rounds = files.iter().filter(|f| f.round.is_some()).count();
            let finals: Vec<String> = files
                .iter()
                .filter(|f| f.round.is_none())
                .map(|f| match &f.group {
                    Some(group) => format!("{group} ({} bytes)", f.size),
                    None => format!("{} bytes", f.size),
                })
                .collect();
            let last = files.iter().filter_map(|f| f.round).max();
            field(
                &mut out,
                2,
                "Checkpoints",
                match last {
                    Some(last) => format!("{rounds} (latest round {last})"),
                    None => "0".to_owned(),
                },
            );
            field(
                &mut out,
                2,
                "Final model",
                if finals.is_empty() { "not yet".to_owned() } else { finals.join(", ") },
            );
        }
        (None, why) => field(
            &mut out,
            2,
            "Models",
            format!("not listed: {}", why.as_deref().unwrap_or("unknown")),
        ),
    }

    let counts = d
        .status
        .tasks
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(state, n)| format!("{state} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "Tasks ({}){}",
        d.tasks.len(),
        if counts.is_empty() { String::new() } else { format!(": {counts}") }
    );
    if !d.tasks.is_empty() {
        let rows = d
            .tasks
            .iter()
            .map(|t| {
                vec![
                    t.task_id.to_string(),
                    t.role.clone(),
                    t.compute_id.to_string(),
                    output::run_by(t).to_owned(),
                    t.state.to_string(),
                    t.restarts.to_string(),
                    t.last_heartbeat.map_or_else(|| "-".to_owned(), |at| age(at, now)),
                ]
            })
            .collect();
        let table = output::table(
            &["TASK", "ROLE", "COMPUTE", "RUN BY", "STATE", "RESTARTS", "HEARTBEAT"],
            rows,
        );
        indented(&mut out, &table, 2);
    }

    out.push_str("Metrics:\n");
    let progress = summarize(&d.metrics);
    if d.metrics.is_empty() {
        out.push_str("  none yet\n");
    } else {
        let round = match total_rounds(job) {
            Some(total) => format!("{}/{total}", progress.round),
            None => progress.round.to_string(),
        };
        field(&mut out, 2, "Round", round);
        let mut figures = Vec::new();
        if let Some(loss) = progress.loss {
            figures.push(format!("loss {}", format_metric(loss)));
        }
        if let Some(accuracy) = progress.accuracy {
            figures.push(format!("accuracy {}", format_metric(accuracy)));
        }
        if !figures.is_empty() {
            let label = if progress.measures.is_empty() { "Latest" } else { progress.measures };
            field(&mut out, 2, "Progress", format!("{label}: {}", figures.join(", ")));
        }
        for (role, (round, values)) in latest_by_role(&d.metrics) {
            let shown: Vec<String> = values
                .iter()
                .take(MAX_METRICS)
                .map(|(name, value)| format!("{name}={}", format_metric(*value)))
                .collect();
            let more = values.len().saturating_sub(MAX_METRICS);
            let more = if more > 0 { format!(" (+{more} more)") } else { String::new() };
            field(&mut out, 2, role, format!("round {round}: {}{more}", shown.join(", ")));
        }
    }

    out.push_str("Problems:\n");
    let mut problems = 0;
    for task in d.tasks.iter().filter(|t| t.state == TaskState::Failed) {
        problems += 1;
        let _ = writeln!(out, "  task {} ({}) failed:", task.task_id, task.role);
        for line in last_lines(&task.log, LOG_LINES) {
            let _ = writeln!(out, "    | {line}");
        }
    }
    for task in d.tasks.iter().filter(|t| t.restarts > 0) {
        problems += 1;
        let times = if task.restarts == 1 { "once" } else { "times" };
        let count = if task.restarts == 1 { String::new() } else { format!("{} ", task.restarts) };
        let _ =
            writeln!(out, "  task {} ({}) was restarted {count}{times}", task.task_id, task.role);
    }
    if problems == 0 {
        out.push_str("  none\n");
    }
    out
}

/// The text of `describe task`.
pub fn task_text(d: &TaskDescription, now: DateTime<Utc>) -> String {
    let t = &d.task;
    let mut out = String::new();
    field(&mut out, 0, "Task", &t.task_id);
    field(&mut out, 0, "Job", &t.job_id);
    field(&mut out, 0, "Role", format!("{} (index {})", t.role, t.index));
    let groups = t
        .group_association
        .iter()
        .map(|(channel, group)| format!("{channel}={group}"))
        .collect::<Vec<_>>()
        .join(", ");
    field(&mut out, 0, "Groups", if groups.is_empty() { "-".to_owned() } else { groups });
    field(&mut out, 0, "Dataset", t.dataset_id.as_ref().map_or("-", |d| d.as_str()));
    field(&mut out, 0, "Compute", &t.compute_id);
    field(&mut out, 0, "Run by", output::run_by(t));
    field(&mut out, 0, "State", t.state);
    field(&mut out, 0, "Restarts", t.restarts);
    field(&mut out, 0, "Last heartbeat", when(t.last_heartbeat, now));
    field(&mut out, 0, "Updated", when(t.updated_at, now));
    out.push_str("Metrics:\n");
    match d.metrics.iter().max_by_key(|r| r.round) {
        None => out.push_str("  none yet\n"),
        Some(latest) => {
            field(&mut out, 2, "Records", d.metrics.len());
            let values: Vec<String> = latest
                .metrics
                .iter()
                .filter(|(name, _)| !output::is_channel_metric(name))
                .take(MAX_METRICS)
                .map(|(name, value)| format!("{name}={}", format_metric(*value)))
                .collect();
            field(&mut out, 2, "Latest", format!("round {}: {}", latest.round, values.join(", ")));
        }
    }
    let lines = last_lines(&t.log, LOG_LINES);
    let _ = writeln!(out, "Log (last {} lines; `fledgectl logs` has the rest):", lines.len());
    if lines.is_empty() {
        out.push_str("  (empty)\n");
    }
    for line in lines {
        let _ = writeln!(out, "  | {line}");
    }
    out
}
