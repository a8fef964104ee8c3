//! Running tasks: one from its config ([`run_task`]), or a whole job in one process
//! ([`simulate`]).
//!
//! [`run_task`] finds the task's role in the role table ([`crate::table`]: by
//! [`RunOptions::role`], else the config's role name, else its function tags) and runs it
//! with the one generic runner, [`crate::role::run`], which opens the task's I/O, bounds the
//! run by `maxRunTime` (seconds, 0 for none), runs the role's program and closes the I/O.
//!
//! [`simulate`] generates the task configs of a two- or three-tier job ([`JobPlan`]) on the
//! `local` backend with a private hub and runs every task concurrently in this process. The
//! same generator with the `mqtt` backend gives the configs of a multi-process run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use fledge_channel::{BackendEnv, LocalHub};
use fledge_types::{Backend, TaskConfig};
use tokio::task::JoinSet;

use crate::Result;
use crate::app::AppFactory;
pub use crate::plan::JobPlan;
pub use crate::role::{RunOptions, RunSummary};
use crate::table;

/// Runs the task `config` with user code from `factory` and options from the environment.
pub async fn run_task(config: TaskConfig, factory: Arc<dyn AppFactory>) -> Result<RunSummary> {
    run_task_with(config, factory, RunOptions::from_env()?).await
}

/// Runs the task `config` with explicit options: the role is [`RunOptions::role`] when set,
/// else the one [`table::resolve`] finds from the config (its role name, else its function
/// tags).
pub async fn run_task_with(
    config: TaskConfig,
    factory: Arc<dyn AppFactory>,
    opts: RunOptions,
) -> Result<RunSummary> {
    let entry = match opts.role {
        Some(kind) => table::entry_of(kind),
        None => table::resolve(None, &config)?,
    };
    (entry.run)(config, factory, opts).await
}

/// Result of a simulation.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// The first task's run (the top aggregator, the ring's leader, the label party).
    pub top: RunSummary,
    /// Every other task's run, by task id (absent when it failed).
    pub others: BTreeMap<String, Result<RunSummary, String>>,
}

/// Runs every task of `plan` concurrently in this process over a private local hub.
///
/// The job succeeds when the top aggregator does; failures of other tasks are reported in
/// [`SimReport::others`] (a dead trainer is dropped by the quorum rule, not fatal).
pub async fn simulate(
    plan: &JobPlan,
    factory: Arc<dyn AppFactory>,
    workdir: PathBuf,
) -> Result<SimReport> {
    let mut plan = plan.clone();
    plan.backend = Backend::Local;
    let opts = RunOptions {
        workdir,
        task_key: None,
        backend_env: BackendEnv { local_hub: LocalHub::new(), ..BackendEnv::default() },
        role: None,
        observer: None,
    };
    simulate_with(&plan, factory, opts).await
}

/// Runs every task of `plan` concurrently in this process on the plan's own backend (e.g.
/// MQTT through a broker the caller started), with `opts` for every task.
pub async fn simulate_with(
    plan: &JobPlan,
    factory: Arc<dyn AppFactory>,
    opts: RunOptions,
) -> Result<SimReport> {
    let configs = plan.configs()?;
    let top_id = configs.first().map(|c| c.task_id.as_str().to_owned()).unwrap_or_default();
    let mut set = JoinSet::new();
    for config in configs {
        let (factory, opts) = (factory.clone(), opts.clone());
        set.spawn(async move {
            let id = config.task_id.as_str().to_owned();
            let res = run_task_with(config, factory, opts).await;
            (id, res)
        });
    }
    let mut top = None;
    let mut others = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let (id, res) = joined?;
        if id == top_id {
            top = Some(res);
        } else {
            if let Err(e) = &res {
                tracing::warn!(task_id = %id, error = %error_chain(e), "simulated task failed");
            }
            others.insert(id, res.map_err(|e| error_chain(&e)));
        }
    }
    let top = top.ok_or_else(|| crate::Error::Config("the plan has no tasks".to_owned()))??;
    Ok(SimReport { top, others })
}

/// `e` and its sources, joined with `: `.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut res = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        res.push_str(": ");
        res.push_str(&s.to_string());
        source = s.source();
    }
    res
}
