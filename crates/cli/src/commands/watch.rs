//! `job watch ID`: follows a job until it ends, with a per-round progress bar (from the job's
//! metrics and its `rounds` hyperparameter), the latest loss/accuracy and task state counts.
//! On a terminal it draws an indicatif bar on stderr; otherwise it prints a line per change.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use fledge_client::JobStatus;
use fledge_types::{Job, JobId, JobState, MetricRecord};

use super::Ctx;
use crate::output;

/// Consecutive failed polls tolerated before the watch gives up.
const MAX_POLL_FAILURES: u32 = 5;

/// The job ended in a state other than `completed`.
#[derive(Debug, thiserror::Error)]
#[error("job {id} ended {state}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
pub struct NotCompleted {
    /// The job.
    pub id: JobId,
    /// Its final state.
    pub state: JobState,
    /// Why, if the control plane said.
    pub reason: Option<String>,
}

/// The watch reached its `--timeout` before the job ended.
#[derive(Debug, thiserror::Error)]
#[error(
    "timed out: job {id} has not ended after {}{}; it goes on (`fledgectl job watch {id}` follows it again)",
    humanize(*timeout),
    state.map(|s| format!(" (it is {s})")).unwrap_or_default()
)]
pub struct TimedOut {
    /// The job.
    pub id: JobId,
    /// The `--timeout`.
    pub timeout: Duration,
    /// Its state when the watch gave up, if a last look could tell.
    pub state: Option<JobState>,
}

/// `1h30m`, `45s`, `250ms`: a duration as `--timeout` takes it.
pub fn humanize(duration: Duration) -> String {
    let mut ms = duration.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut res = String::new();
    for (unit, size) in
        [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)]
    {
        if ms >= size {
            res.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    res
}

/// How `job watch` polls and how long it waits.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Poll interval in milliseconds.
    pub interval_ms: u64,
    /// Give up after this long (`None`: wait until the job ends).
    pub timeout: Option<Duration>,
}

/// Progress distilled from a job's metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// Highest round any task reported.
    pub round: u64,
    /// Loss at the latest round that has one (see [`summarize`] for which).
    pub loss: Option<f64>,
    /// Accuracy at the latest round that has one (see [`summarize`] for which).
    pub accuracy: Option<f64>,
    /// Which model `loss` and `accuracy` measure, for the status line ("" when unknown).
    pub measures: &'static str,
}

/// Summarises metric records into the latest round and its loss and accuracy, from the first
/// source that has an accuracy:
/// 1. `global.*`: the aggregator's evaluation of the global model;
/// 2. `trainer.afterTraining.*`: an aggregator's sample-weighted mean of its trainers'
///    evaluations of their locally trained models;
/// 3. `afterTraining.*`: the plain mean of the trainers' own records (a round in progress);
/// 4. plain `accuracy` / `loss` (roles without an aggregator, e.g. ring trainers or the
///    vertical label party, which evaluate the model they share).
pub fn summarize(records: &[MetricRecord]) -> Progress {
    let latest_mean = |name: &str| -> Option<f64> {
        let round =
            records.iter().filter(|r| r.metrics.contains_key(name)).map(|r| r.round).max()?;
        let values: Vec<f64> = records
            .iter()
            .filter(|r| r.round == round)
            .filter_map(|r| r.metrics.get(name).copied())
            .collect();
        Some(values.iter().sum::<f64>() / values.len() as f64)
    };
    let round = records.iter().map(|r| r.round).max().unwrap_or(0);
    for (prefix, measures) in [
        ("global.", "global model"),
        ("trainer.afterTraining.", "trainers' mean"),
        ("afterTraining.", "trainers' mean"),
        ("", ""),
    ] {
        if let Some(accuracy) = latest_mean(&format!("{prefix}accuracy")) {
            let loss = latest_mean(&format!("{prefix}loss"));
            return Progress { round, loss, accuracy: Some(accuracy), measures };
        }
    }
    Progress { round, loss: latest_mean("loss"), accuracy: None, measures: "" }
}

/// The `rounds` hyperparameter of a job, if it has a positive integer one.
pub fn total_rounds(job: &Job) -> Option<u64> {
    job.spec
        .model_spec
        .hyperparameters
        .get("rounds")
        .and_then(serde_json::Value::as_u64)
        .filter(|n| *n > 0)
}

/// One status line: state, task counts, loss and accuracy.
pub fn describe(status: &JobStatus, progress: &Progress) -> String {
    let mut res = status.state.to_string();
    let counts: Vec<String> = status
        .tasks
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(state, n)| format!("{state} {n}"))
        .collect();
    if !counts.is_empty() {
        res.push_str(&format!(" | tasks: {}", counts.join(", ")));
    }
    if progress.accuracy.is_some() || progress.loss.is_some() {
        res.push_str(" |");
        if !progress.measures.is_empty() {
            res.push_str(&format!(" {}:", progress.measures));
        }
    }
    if let Some(loss) = progress.loss {
        res.push_str(&format!(" loss {}", output::format_metric(loss)));
    }
    if let Some(accuracy) = progress.accuracy {
        if progress.loss.is_some() {
            res.push(',');
        }
        res.push_str(&format!(" accuracy {}", output::format_metric(accuracy)));
    }
    // Why a live job waits (e.g. for the data owners of participant-run tasks).
    if let Some(reason) = status.reason.as_deref().filter(|_| !status.state.is_final()) {
        res.push_str(&format!(" | {reason}"));
    }
    res
}

/// Follows `id` until it ends and returns the final job; fails with [`TimedOut`] once
/// `options.timeout` has passed (a poll in flight is abandoned then).
pub async fn watch(ctx: &Ctx, id: &JobId, options: Options) -> anyhow::Result<Job> {
    let Some(timeout) = options.timeout else {
        return follow(ctx, id, options.interval_ms).await;
    };
    match tokio::time::timeout(timeout, follow(ctx, id, options.interval_ms)).await {
        Ok(res) => res,
        Err(_) => {
            // One bounded look at where it stands, for the message.
            let state =
                match tokio::time::timeout(Duration::from_secs(5), ctx.client.get_job(id)).await {
                    Ok(Ok(job)) if job.state.is_final() => return Ok(job),
                    Ok(Ok(job)) => Some(job.state),
                    _ => None,
                };
            Err(TimedOut { id: id.clone(), timeout, state }.into())
        }
    }
}

async fn follow(ctx: &Ctx, id: &JobId, interval_ms: u64) -> anyhow::Result<Job> {
    let job = ctx.client.get_job(id).await?;
    let rounds = total_rounds(&job);
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(rounds, ProgressDrawTarget::stderr());
    if tty {
        let template = match rounds {
            Some(_) => "{spinner} round {pos}/{len} [{bar:30}] {elapsed} {msg}",
            None => "{spinner} round {pos} {elapsed} {msg}",
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let mut last_line = String::new();
    let mut failures = 0;
    let final_state = loop {
        let polled = async {
            let status = ctx.client.job_status(id).await?;
            let metrics = ctx.client.job_metrics(id).await?;
            Ok::<_, fledge_client::Error>((status, metrics))
        }
        .await;
        let (status, metrics) = match polled {
            Ok(polled) => {
                failures = 0;
                polled
            }
            Err(err @ fledge_client::Error::Connect { .. }) if failures < MAX_POLL_FAILURES => {
                failures += 1;
                bar.suspend(|| eprintln!("warning: {err}; retrying"));
                tokio::time::sleep(Duration::from_millis(interval_ms)).await;
                continue;
            }
            Err(err) => {
                bar.abandon();
                return Err(err.into());
            }
        };
        let progress = summarize(&metrics);
        let line = describe(&status, &progress);
        bar.set_position(progress.round);
        bar.set_message(line.clone());
        if !tty && line != last_line {
            let round = match rounds {
                Some(total) => format!("round {}/{total}", progress.round),
                None => format!("round {}", progress.round),
            };
            eprintln!("job {id}: {round} | {line}");
        }
        last_line = line;
        if status.state.is_final() {
            break status.state;
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    };
    bar.finish();
    let job = ctx.client.get_job(id).await?;
    tracing::debug!(%id, state = %final_state, "job ended");
    Ok(job)
}

/// Lines of each failed task's log shown when a job did not complete.
const LOG_TAIL_LINES: usize = 10;

/// The last `n` lines of `log`.
fn tail(log: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = log.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Tells the user which tasks failed and why (the tail of their logs), on stderr.
async fn explain_failure(ctx: &Ctx, id: &JobId) {
    let tasks = match ctx.client.list_tasks(id).await {
        Ok(tasks) => tasks,
        Err(err) => {
            eprintln!("cannot list the job's tasks: {err}");
            return;
        }
    };
    for task in tasks.iter().filter(|t| t.state == fledge_types::TaskState::Failed) {
        // The listing may omit logs; the task itself carries the tail.
        let log = match ctx.client.get_task(id, &task.task_id).await {
            Ok(full) => full.log,
            Err(_) => task.log.clone(),
        };
        eprintln!("task {} ({}) failed", task.task_id, task.role);
        for line in tail(&log, LOG_TAIL_LINES) {
            eprintln!("  | {line}");
        }
    }
}

/// Watches, prints the final job, and fails unless it completed.
pub async fn watch_and_report(ctx: &Ctx, id: &JobId, options: Options) -> anyhow::Result<()> {
    let job = watch(ctx, id, options).await?;
    eprintln!("job {} ended {}", job.id, job.state);
    if job.state != JobState::Completed {
        explain_failure(ctx, &job.id).await;
    }
    ctx.resource(&job, output::jobs)?;
    if job.state == JobState::Completed {
        Ok(())
    } else {
        Err(NotCompleted { id: job.id.clone(), state: job.state, reason: job.reason.clone() }
            .into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn record(round: u64, metrics: &[(&str, f64)]) -> MetricRecord {
        MetricRecord {
            task_id: "t".into(),
            role: "trainer".into(),
            round,
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect::<BTreeMap<_, _>>(),
            timestamp: None,
        }
    }

    #[test]
    fn durations_print_as_timeouts_are_written() {
        assert_eq!(humanize(Duration::from_secs(5400)), "1h30m");
        assert_eq!(humanize(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(humanize(Duration::from_secs(2 * 86_400)), "2d");
        assert_eq!(humanize(Duration::ZERO), "0s");
        for text in ["1h30m", "45s", "2d3h", "250ms"] {
            let parsed = crate::args::parse_duration(text).unwrap();
            assert_eq!(humanize(parsed), text);
        }
    }

    #[test]
    fn log_tails_keep_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(tail("a", 5), ["a"]);
        assert!(tail("", 3).is_empty());
    }

    #[test]
    fn progress_uses_the_latest_round_with_each_metric() {
        assert_eq!(summarize(&[]), Progress::default());
        let records = [
            record(1, &[("loss", 1.0), ("accuracy", 0.5)]),
            record(2, &[("loss", 0.5)]),
            record(2, &[("loss", 0.25)]),
            record(3, &[("bytesSent", 10.0)]),
        ];
        let progress = summarize(&records);
        assert_eq!(progress.round, 3);
        assert_eq!(progress.loss, Some(0.375));
        assert_eq!(progress.accuracy, Some(0.5));

        let status = JobStatus {
            state: JobState::Running,
            reason: None,
            tasks: [("running".to_owned(), 3), ("failed".to_owned(), 0)].into_iter().collect(),
        };
        assert_eq!(
            describe(&status, &progress),
            "running | tasks: running 3 | loss 0.3750, accuracy 0.5000"
        );

        // An aggregator's round averages win over trainers' partial reports.
        let mut with_aggregate = records.to_vec();
        with_aggregate.push(record(
            2,
            &[("trainer.afterTraining.loss", 0.4), ("trainer.afterTraining.accuracy", 0.8)],
        ));
        with_aggregate
            .push(record(3, &[("afterTraining.loss", 9.0), ("afterTraining.accuracy", 0.1)]));
        let progress = summarize(&with_aggregate);
        assert_eq!((progress.round, progress.loss, progress.accuracy), (3, Some(0.4), Some(0.8)));
        assert_eq!(progress.measures, "trainers' mean");

        // The global model's own evaluation wins over every trainer figure.
        with_aggregate.push(record(2, &[("global.accuracy", 0.85), ("global.loss", 0.3)]));
        let progress = summarize(&with_aggregate);
        assert_eq!((progress.loss, progress.accuracy), (Some(0.3), Some(0.85)));
        assert_eq!(
            describe(&status, &progress),
            "running | tasks: running 3 | global model: loss 0.3000, accuracy 0.8500"
        );
    }
}
