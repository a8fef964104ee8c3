//! Running user code on the Rust runtime: one task ([`run_task`]) or a whole job
//! ([`simulate`]).
//!
//! Both build a tokio runtime, release the GIL for as long as it runs and poll Python's
//! signal handlers every 200 ms (with the GIL, briefly) so that Ctrl-C interrupts a run.
//! Results come back as JSON text (summaries, metric history) plus the final model as numpy
//! arrays; the Python side wraps them in dataclasses.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fledge_channel::{BackendEnv, LocalHub};
use fledge_sdk::plan::Topology;
use fledge_sdk::runner::{self, JobPlan, RunOptions, RunSummary};
use fledge_sdk::table;
use fledge_sdk::{AppFactory, RecordObserver};
use fledge_types::{Sort, TaskConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::app::{OnUserError, PyFactory};
use crate::convert::weights_into_py;
use crate::progress::Progress;
use crate::{ConfigError, TaskError};

/// How often a run checks Python's signal handlers.
const SIGNAL_POLL: Duration = Duration::from_millis(200);

/// How long the other tasks of a simulation may take to finish once the top aggregator has.
const WIND_DOWN: Duration = Duration::from_secs(10);

/// Why a blocking call did not produce its result.
pub(crate) enum Stop {
    /// The operation failed: the error chain.
    Failed(String),
    /// The operation did not finish in time.
    TimedOut,
    /// A signal handler raised (e.g. `KeyboardInterrupt`).
    Interrupted(PyErr),
}

/// Runs `fut` on `rt` with the GIL released, checking Python's signal handlers every
/// [`SIGNAL_POLL`] so that Ctrl-C interrupts it.
pub(crate) fn block_on_detached_with<T, F>(
    py: Python<'_>,
    rt: &tokio::runtime::Runtime,
    fut: F,
) -> Result<T, Stop>
where
    T: Send,
    F: Future<Output = Result<T, Stop>> + Send,
{
    py.detach(|| {
        rt.block_on(async {
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    res = &mut fut => return res,
                    () = tokio::time::sleep(SIGNAL_POLL) => {
                        Python::attach(|py| py.check_signals()).map_err(Stop::Interrupted)?;
                    }
                }
            }
        })
    })
}

/// Runs `fut` on a new runtime with the GIL released (see [`block_on_detached_with`]). When
/// the `progress` callback raises, the run stops and its exception propagates.
fn block_on_detached<T, F>(
    py: Python<'_>,
    progress: Option<Arc<Progress>>,
    fut: F,
) -> PyResult<Result<T, String>>
where
    T: Send,
    F: Future<Output = Result<T, String>> + Send,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fledge-runtime")
        .build()
        .map_err(|e| TaskError::new_err(format!("cannot start the tokio runtime: {e}")))?;
    let res = block_on_detached_with(py, &rt, async move {
        let failure = async {
            match &progress {
                Some(progress) => progress.failure().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = fut => res.map_err(Stop::Failed),
            err = failure => Err(Stop::Interrupted(err)),
        }
    });
    // Tasks still running (e.g. a simulation's stragglers) end with the runtime, GIL released.
    py.detach(move || drop(rt));
    match res {
        Ok(v) => Ok(Ok(v)),
        Err(Stop::Failed(msg)) => Ok(Err(msg)),
        Err(Stop::TimedOut) => Ok(Err("timed out".to_owned())),
        Err(Stop::Interrupted(e)) => Err(e),
    }
}

/// A run summary as JSON (`kind`, `rounds`, `history`).
fn summary_json(summary: &RunSummary) -> Value {
    json!({
        "kind": summary.kind.name(),
        "rounds": summary.rounds,
        "history": summary.history,
    })
}

/// Parses and validates a task config (JSON text); returns it normalised as JSON text.
///
/// Raises `ConfigError` naming the field when it is invalid.
#[pyfunction]
pub fn parse_config(config_json: &str) -> PyResult<String> {
    let config = read_config(config_json)?;
    serde_json::to_string(&config)
        .map_err(|e| ConfigError::new_err(format!("cannot serialise the task config: {e}")))
}

fn read_config(config_json: &str) -> PyResult<TaskConfig> {
    let de = &mut serde_json::Deserializer::from_str(config_json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new_err(format!("task config is invalid at {path}: {}", e.into_inner()))
    })
}

/// The names of the built-in roles, in the order of the SDK's role table (`fledge roles`).
#[pyfunction]
pub fn builtin_roles() -> Vec<&'static str> {
    table::names()
}

/// Runs one task from its config (JSON text) with the given user classes, as the built-in
/// role `role` (else the one the SDK's role table resolves from the config).
///
/// Returns `(summary_json, final_model)`: the final model is the model the role ends with
/// (an aggregator's global model, a ring member's, a party's), `None` for a trainer. Raises `TaskError` with the error chain (and
/// the traceback of user code) when the task fails; with `exit_on_user_error`, a failure of
/// user code instead writes the traceback to stderr and exits the process with code 2 at
/// once, before the role leaves its channels (see [`OnUserError::Exit`]).
#[pyfunction]
#[pyo3(signature = (
    config_json, trainer=None, evaluator=None, workdir=None, exit_on_user_error=false,
    role=None, feature_party=None, label_party=None, progress=None
))]
#[allow(clippy::too_many_arguments)]
pub fn run_task<'py>(
    py: Python<'py>,
    config_json: &str,
    trainer: Option<Py<PyAny>>,
    evaluator: Option<Py<PyAny>>,
    workdir: Option<PathBuf>,
    exit_on_user_error: bool,
    role: Option<&str>,
    feature_party: Option<Py<PyAny>>,
    label_party: Option<Py<PyAny>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(String, Option<Bound<'py, PyDict>>)> {
    crate::logging::refresh();
    let config = read_config(config_json)?;
    let progress = progress.map(Progress::new);
    let mut opts = RunOptions::from_env()
        .map_err(|e| ConfigError::new_err(fledge_sdk::runner::error_chain(&e)))?;
    opts.observer = progress.as_ref().map(Progress::observer);
    if let Some(dir) = workdir {
        opts.workdir = dir;
    }
    let entry = table::resolve(role, &config).map_err(|e| ConfigError::new_err(e.to_string()))?;
    let on_error = if exit_on_user_error { OnUserError::Exit } else { OnUserError::Raise };
    let factory = Arc::new(PyFactory { trainer, evaluator, feature_party, label_party, on_error });
    tracing::info!(task_id = %config.task_id, role = entry.name(), "running python task");
    let res = block_on_detached(py, progress, async move {
        (entry.run)(config, factory, opts).await.map_err(|e| runner::error_chain(&e))
    })?;
    let summary = res.map_err(TaskError::new_err)?;
    let text = summary_json(&summary).to_string();
    let model = summary.final_model.map(|w| weights_into_py(py, w)).transpose()?;
    Ok((text, model))
}

/// Runs a whole job in this process over the local backend: one aggregator (plus `middle`
/// middle aggregators) and one trainer per dataset URL.
///
/// Returns `(top_json, final_model, others_json)`; `others_json` maps each other task id to
/// `{"ok": summary}` or `{"error": chain}`. Raises `TaskError` when the top aggregator fails,
/// with the failures of the other tasks appended (they usually explain it).
#[pyfunction]
#[pyo3(signature = (
    trainer, datasets, hyperparameters_json="{}", middle=0, optimizer_json=None,
    selector_json=None, workdir=None, evaluator=None, job_id="sim", timeout=0.0,
    topology="tree", feature_party=None, label_party=None, progress=None
))]
#[allow(clippy::too_many_arguments)]
pub fn simulate<'py>(
    py: Python<'py>,
    trainer: Option<Py<PyAny>>,
    datasets: Vec<String>,
    hyperparameters_json: &str,
    middle: usize,
    optimizer_json: Option<&str>,
    selector_json: Option<&str>,
    workdir: Option<PathBuf>,
    evaluator: Option<Py<PyAny>>,
    job_id: &str,
    timeout: f64,
    topology: &str,
    feature_party: Option<Py<PyAny>>,
    label_party: Option<Py<PyAny>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(String, Option<Bound<'py, PyDict>>, String)> {
    crate::logging::refresh();
    let mut plan = JobPlan::local(job_id, datasets);
    plan.middle = middle;
    plan.topology = match topology {
        "tree" => Topology::Tree,
        "ring" => Topology::Ring,
        "vertical" => Topology::Vertical,
        other => {
            return Err(ConfigError::new_err(format!(
                "topology must be \"tree\", \"ring\" or \"vertical\", not {other:?}"
            )));
        }
    };
    plan.hyperparameters = serde_json::from_str(hyperparameters_json)
        .map_err(|e| ConfigError::new_err(format!("hyperparameters must be a JSON object: {e}")))?;
    if let Some(text) = optimizer_json {
        plan.optimizer = parse_sort(text, "optimizer")?;
    }
    if let Some(text) = selector_json {
        plan.selector = parse_sort(text, "selector")?;
    }
    // Reject a bad plan before starting anything.
    plan.configs().map_err(|e| ConfigError::new_err(runner::error_chain(&e)))?;
    if !timeout.is_finite() || timeout < 0.0 {
        return Err(ConfigError::new_err(format!("timeout must be >= 0 seconds, not {timeout}")));
    }
    let workdir = match workdir {
        Some(dir) => dir,
        None => std::env::current_dir()
            .map_err(|e| ConfigError::new_err(format!("no working directory: {e}")))?,
    };
    let factory: Arc<dyn AppFactory> = Arc::new(PyFactory {
        trainer,
        evaluator,
        feature_party,
        label_party,
        on_error: OnUserError::Raise,
    });
    let progress = progress.map(Progress::new);
    let observer = progress.as_ref().map(Progress::observer);
    let res = block_on_detached(py, progress, async move {
        let deadline =
            (timeout > 0.0).then(|| tokio::time::Instant::now() + Duration::from_secs_f64(timeout));
        run_all(&plan, factory, workdir, deadline, observer).await
    })?;
    let (mut top, others) = res.map_err(TaskError::new_err)?;
    let others: BTreeMap<String, Value> = others
        .iter()
        .map(|(id, res)| {
            let v = match res {
                Ok(summary) => json!({ "ok": summary_json(summary) }),
                Err(chain) => json!({ "error": chain }),
            };
            (id.clone(), v)
        })
        .collect();
    let model = top.final_model.take().map(|w| weights_into_py(py, w)).transpose()?;
    let top = summary_json(&top).to_string();
    let others = serde_json::to_string(&others).map_err(|e| TaskError::new_err(e.to_string()))?;
    Ok((top, model, others))
}

/// Runs every task of `plan` concurrently over a private local hub, like
/// `fledge_sdk::runner::simulate`, but keeps the other tasks' results when the top
/// aggregator fails so that the error can say why (usually a trainer's user code). The
/// `observer` sees the top task's records: one per round of the job.
async fn run_all(
    plan: &JobPlan,
    factory: Arc<dyn AppFactory>,
    workdir: PathBuf,
    deadline: Option<tokio::time::Instant>,
    observer: Option<RecordObserver>,
) -> Result<(RunSummary, BTreeMap<String, Result<RunSummary, String>>), String> {
    let configs = plan.configs().map_err(|e| runner::error_chain(&e))?;
    let opts = RunOptions {
        workdir,
        task_key: None,
        backend_env: BackendEnv { local_hub: LocalHub::new(), ..BackendEnv::default() },
        role: None,
        observer: None,
    };
    let top_id = configs.first().map(|c| c.task_id.as_str().to_owned()).unwrap_or_default();
    let mut set = JoinSet::new();
    for config in configs {
        let (factory, mut opts) = (factory.clone(), opts.clone());
        let id = config.task_id.as_str().to_owned();
        if id == top_id {
            opts.observer = observer.clone();
        }
        set.spawn(async move {
            let res = runner::run_task_with(config, factory, opts)
                .await
                .map_err(|e| runner::error_chain(&e));
            (id, res)
        });
    }
    let mut top: Option<Result<RunSummary, String>> = None;
    let mut others = BTreeMap::new();
    let mut deadline = deadline;
    loop {
        let next = match deadline {
            Some(at) => match tokio::time::timeout_at(at, set.join_next()).await {
                Ok(next) => next,
                Err(_) => {
                    set.abort_all();
                    if top.is_none() {
                        top = Some(Err(
                            "the simulation did not finish within its timeout".to_owned()
                        ));
                    }
                    break;
                }
            },
            None => set.join_next().await,
        };
        let Some(joined) = next else { break };
        let (id, res) =
            joined.map_err(|e| format!("a simulated task panicked or was cancelled: {e}"))?;
        if id == top_id {
            top = Some(res);
            // The job is decided: the others only have to wind down.
            let grace = tokio::time::Instant::now() + WIND_DOWN;
            deadline = Some(deadline.map_or(grace, |at| at.min(grace)));
        } else {
            others.insert(id, res);
        }
    }
    match top {
        Some(Ok(summary)) => Ok((summary, others)),
        Some(Err(chain)) => {
            let mut msg = format!("task {top_id} failed: {chain}");
            for (id, res) in &others {
                if let Err(e) = res {
                    msg.push_str(&format!("\ntask {id} failed: {e}"));
                }
            }
            Err(msg)
        }
        None => Err("the plan has no tasks".to_owned()),
    }
}

fn parse_sort(text: &str, what: &str) -> PyResult<Sort> {
    serde_json::from_str(text).map_err(|e| ConfigError::new_err(format!("{what} is invalid: {e}")))
}
