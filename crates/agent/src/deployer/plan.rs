//! The deployer's decisions as a pure state machine: [`Plan::step`] takes an [`Input`] and
//! returns the [`Effect`]s to carry out, without I/O, so every rule (one worker per task, the
//! worker limit and its FIFO queue, what to report when a worker ends) is unit-tested here and
//! the event loop in the parent module only executes effects.

use std::collections::{HashMap, VecDeque};

use fledge_proto::TaskDeployment;
use fledge_types::{JobId, TaskId};

use crate::api::DeploymentState;

/// A task waiting for, or getting, a worker.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Pending {
    pub(crate) job: JobId,
    pub(crate) task: TaskDeployment,
    pub(crate) apiserver: String,
    pub(crate) notifier: String,
}

impl Pending {
    pub(crate) fn task_id(&self) -> TaskId {
        TaskId::new(self.task.task_id.clone())
    }

    /// The worker's attempt: the task's restarts when the controller deployed it.
    pub(crate) fn attempt(&self) -> u32 {
        self.task.attempt
    }
}

/// How a worker ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    /// Its exit status, described (`exit code 2`, `signal 9 (SIGKILL)`).
    pub(crate) status: String,
    /// Whether the fledgelet reported the task's final state itself.
    pub(crate) reported: bool,
    /// Whether the deployer stopped it (revoke).
    pub(crate) killed: bool,
    /// The end of the fledgelet's own output.
    pub(crate) log_tail: String,
}

/// Something that happened.
#[derive(Debug)]
pub(crate) enum Input {
    /// Tasks to deploy.
    Deploy(Vec<Pending>),
    /// Stop the job's workers (the listed tasks, or all when empty).
    Revoke { job: JobId, tasks: Vec<TaskId> },
    /// A worker was started.
    Started { job: JobId, task: TaskId },
    /// A worker could not be started.
    StartFailed { job: JobId, task: TaskId, message: String },
    /// A worker exited and was reaped.
    Exited { job: JobId, task: TaskId, ended: Ended },
    /// A worker of `attempt` that an earlier run of the deployer started is still running
    /// (re-adopted on start).
    Adopted { job: JobId, task: TaskId, attempt: u32 },
}

/// Something to do.
#[derive(Debug, PartialEq)]
pub(crate) enum Effect {
    /// Start a worker for this task (answer with `Started` or `StartFailed`).
    Start(Pending),
    /// Stop this task's worker (it will come back as `Exited` with `killed`).
    Kill(TaskId),
    /// Tell the control plane (about the worker of `attempt`).
    Report { job: JobId, task: TaskId, attempt: u32, state: DeploymentState, message: String },
}

/// The deployer's bookkeeping.
#[derive(Debug)]
pub(crate) struct Plan {
    max_workers: usize,
    /// Tasks with a worker (starting or running) → their job and the worker's attempt.
    active: HashMap<TaskId, (JobId, u32)>,
    queue: VecDeque<Pending>,
    /// Tasks whose worker already ran, per job, with the attempt that ran last: a repeated
    /// DEPLOY (a controller resync, a redelivery) must not start that attempt again; only a
    /// restart (a higher attempt) does. Forgotten when the whole job is revoked.
    finished: HashMap<JobId, HashMap<TaskId, u32>>,
}

impl Plan {
    pub(crate) fn new(max_workers: usize) -> Self {
        Self {
            max_workers: max_workers.max(1),
            active: HashMap::new(),
            queue: VecDeque::new(),
            finished: HashMap::new(),
        }
    }

    /// Number of tasks with a worker.
    pub(crate) fn active(&self) -> usize {
        self.active.len()
    }

    /// Decides what to do about `input`.
    pub(crate) fn step(&mut self, input: Input) -> Vec<Effect> {
        let mut effects = Vec::new();
        match input {
            Input::Deploy(tasks) => {
                for pending in tasks {
                    let task = pending.task_id();
                    let attempt = pending.attempt();
                    let known = self.active.get(&task).is_some_and(|(_, a)| *a >= attempt)
                        || self.queue.iter().any(|p| {
                            p.task.task_id == pending.task.task_id && p.attempt() >= attempt
                        });
                    let ran = self
                        .finished
                        .get(&pending.job)
                        .and_then(|done| done.get(&task))
                        .is_some_and(|a| *a >= attempt);
                    if known || ran {
                        tracing::debug!(job = %pending.job, %task, attempt, ran, "not deploying again");
                        continue;
                    }
                    // A restart replaces an older attempt still queued; it starts once the
                    // older attempt's worker (if any) has exited.
                    self.queue.retain(|p| p.task.task_id != pending.task.task_id);
                    self.queue.push_back(pending);
                }
            }
            Input::Revoke { job, tasks } => {
                let all = tasks.is_empty();
                let selected = |task: &TaskId| all || tasks.contains(task);
                if all {
                    self.finished.remove(&job);
                }
                let mut kept = VecDeque::with_capacity(self.queue.len());
                for pending in self.queue.drain(..) {
                    let task = pending.task_id();
                    if pending.job == job && selected(&task) {
                        effects.push(report(
                            &job,
                            &task,
                            pending.attempt(),
                            DeploymentState::Revoked,
                            "revoked before it started",
                        ));
                    } else {
                        kept.push_back(pending);
                    }
                }
                self.queue = kept;
                let mut doomed: Vec<&TaskId> = self
                    .active
                    .iter()
                    .filter(|(task, (owner, _))| *owner == job && selected(task))
                    .map(|(task, _)| task)
                    .collect();
                doomed.sort();
                effects.extend(doomed.into_iter().map(|task| Effect::Kill(task.clone())));
            }
            Input::Adopted { job, task, attempt } => {
                self.active.insert(task, (job, attempt));
            }
            Input::Started { job, task } => {
                let attempt = self.attempt(&task);
                effects.push(report(&job, &task, attempt, DeploymentState::Deployed, ""));
            }
            Input::StartFailed { job, task, message } => {
                let attempt = self.retire(&job, &task);
                effects.push(report(&job, &task, attempt, DeploymentState::Failed, &message));
            }
            Input::Exited { job, task, ended } => {
                let attempt = self.retire(&job, &task);
                if ended.killed {
                    effects.push(report(
                        &job,
                        &task,
                        attempt,
                        DeploymentState::Revoked,
                        "worker revoked",
                    ));
                } else if !ended.reported {
                    let mut message =
                        format!("worker exited with {} before reporting", ended.status);
                    if !ended.log_tail.is_empty() {
                        message.push_str("; its last output:\n");
                        message.push_str(&ended.log_tail);
                    }
                    effects.push(report(&job, &task, attempt, DeploymentState::Failed, &message));
                }
            }
        }
        // Fill free slots in arrival order; a restart waits for its older worker to exit.
        while self.active.len() < self.max_workers {
            let Some(at) = self.queue.iter().position(|p| !self.active.contains_key(&p.task_id()))
            else {
                break;
            };
            let pending = self.queue.remove(at).expect("position is in range");
            self.active.insert(pending.task_id(), (pending.job.clone(), pending.attempt()));
            effects.push(Effect::Start(pending));
        }
        effects
    }

    /// The attempt of `task`'s worker (0 if it has none).
    fn attempt(&self, task: &TaskId) -> u32 {
        self.active.get(task).map_or(0, |(_, attempt)| *attempt)
    }

    /// Forgets `task`'s worker, remembering that its attempt ran; returns the attempt.
    fn retire(&mut self, job: &JobId, task: &TaskId) -> u32 {
        let attempt = self.active.remove(task).map_or(0, |(_, attempt)| attempt);
        let ran = self.finished.entry(job.clone()).or_default().entry(task.clone()).or_insert(0);
        *ran = (*ran).max(attempt);
        attempt
    }
}

fn report(
    job: &JobId,
    task: &TaskId,
    attempt: u32,
    state: DeploymentState,
    message: &str,
) -> Effect {
    Effect::Report {
        job: job.clone(),
        task: task.clone(),
        attempt,
        state,
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(job: &str, task: &str) -> Pending {
        Pending {
            job: JobId::new(job),
            task: TaskDeployment { task_id: task.into(), role: "trainer".into(), attempt: 0 },
            apiserver: "http://api".into(),
            notifier: "http://notifier".into(),
        }
    }

    /// The effects as short strings: `start t1`, `kill t1`, `report t1 Failed: message`.
    fn show(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .map(|effect| match effect {
                Effect::Start(p) => format!("start {}", p.task.task_id),
                Effect::Kill(task) => format!("kill {task}"),
                Effect::Report { task, state, message, .. } if message.is_empty() => {
                    format!("report {task} {state:?}")
                }
                Effect::Report { task, state, message, .. } => {
                    format!("report {task} {state:?}: {message}")
                }
            })
            .collect()
    }

    fn exited(job: &str, task: &str, reported: bool, killed: bool) -> Input {
        Input::Exited {
            job: JobId::new(job),
            task: TaskId::new(task),
            ended: Ended {
                status: "signal 9 (SIGKILL)".into(),
                reported,
                killed,
                log_tail: String::new(),
            },
        }
    }

    #[test]
    fn deploys_each_task_once_within_the_limit_in_arrival_order() {
        let mut plan = Plan::new(2);
        let effects = plan.step(Input::Deploy(vec![
            pending("j", "a"),
            pending("j", "b"),
            pending("j", "c"),
            pending("j", "a"),
        ]));
        assert_eq!(show(&effects), ["start a", "start b"]);
        // Repeats of running and queued tasks change nothing.
        let effects = plan.step(Input::Deploy(vec![pending("j", "b"), pending("j", "c")]));
        assert!(effects.is_empty(), "{effects:?}");
        let effects = plan.step(Input::Started { job: JobId::new("j"), task: TaskId::new("a") });
        assert_eq!(show(&effects), ["report a Deployed"]);
        // A clean exit frees the slot for the queued task and reports nothing itself.
        let effects = plan.step(exited("j", "a", true, false));
        assert_eq!(show(&effects), ["start c"]);
        // A task that already ran is not started again.
        let effects = plan.step(Input::Deploy(vec![pending("j", "a")]));
        assert!(effects.is_empty(), "{effects:?}");
        assert_eq!(plan.active(), 2);
    }

    #[test]
    fn reports_workers_that_died_or_failed_to_start() {
        let mut plan = Plan::new(1);
        plan.step(Input::Deploy(vec![pending("j", "a"), pending("j", "b")]));
        let effects = plan.step(Input::Exited {
            job: JobId::new("j"),
            task: TaskId::new("a"),
            ended: Ended {
                status: "signal 9 (SIGKILL)".into(),
                reported: false,
                killed: false,
                log_tail: "last words".into(),
            },
        });
        assert_eq!(
            show(&effects),
            [
                "report a Failed: worker exited with signal 9 (SIGKILL) before reporting; its last output:\nlast words",
                "start b",
            ]
        );
        let effects = plan.step(Input::StartFailed {
            job: JobId::new("j"),
            task: TaskId::new("b"),
            message: "failed to start fledgelet".into(),
        });
        assert_eq!(show(&effects), ["report b Failed: failed to start fledgelet"]);
        assert_eq!(plan.active(), 0);
    }

    #[test]
    fn revoke_drops_queued_tasks_and_kills_running_ones_of_that_job_only() {
        let mut plan = Plan::new(2);
        plan.step(Input::Deploy(vec![
            pending("j1", "a"),
            pending("j2", "x"),
            pending("j1", "b"),
            pending("j1", "c"),
            pending("j2", "y"),
        ]));
        let effects = plan.step(Input::Revoke { job: JobId::new("j1"), tasks: Vec::new() });
        assert_eq!(
            show(&effects),
            [
                "report b Revoked: revoked before it started",
                "report c Revoked: revoked before it started",
                "kill a",
            ]
        );
        // The killed worker's exit is reported as revoked and frees its slot for j2's task.
        let effects = plan.step(exited("j1", "a", false, true));
        assert_eq!(show(&effects), ["report a Revoked: worker revoked", "start y"]);
        // Revoking by name touches only the named task.
        let effects =
            plan.step(Input::Revoke { job: JobId::new("j2"), tasks: vec![TaskId::new("y")] });
        assert_eq!(show(&effects), ["kill y"]);
    }

    #[test]
    fn revoking_a_whole_job_forgets_which_of_its_tasks_ran() {
        let mut plan = Plan::new(1);
        plan.step(Input::Deploy(vec![pending("j", "a")]));
        plan.step(exited("j", "a", true, false));
        assert!(plan.step(Input::Deploy(vec![pending("j", "a")])).is_empty());
        plan.step(Input::Revoke { job: JobId::new("j"), tasks: Vec::new() });
        assert_eq!(show(&plan.step(Input::Deploy(vec![pending("j", "a")]))), ["start a"]);
    }

    fn restarted(job: &str, task: &str, attempt: u32) -> Pending {
        let mut p = pending(job, task);
        p.task.attempt = attempt;
        p
    }

    #[test]
    fn a_restart_starts_a_new_worker_once_the_old_one_is_gone() {
        let mut plan = Plan::new(4);
        assert_eq!(show(&plan.step(Input::Deploy(vec![pending("j", "a")]))), ["start a"]);
        // The controller restarted the task while its old worker is still being reaped:
        // the new attempt waits for the slot of its task, once.
        assert!(plan.step(Input::Deploy(vec![restarted("j", "a", 1)])).is_empty());
        assert!(plan.step(Input::Deploy(vec![restarted("j", "a", 1)])).is_empty());
        let effects = plan.step(exited("j", "a", true, false));
        assert_eq!(show(&effects), ["start a"]);
        let effects = plan.step(Input::Started { job: JobId::new("j"), task: TaskId::new("a") });
        assert!(matches!(effects[..], [Effect::Report { attempt: 1, .. }]), "{effects:?}");
        // Attempt 1 dies unreported: its report names attempt 1; a redelivered deploy of
        // attempt 0 or 1 starts nothing, attempt 2 does.
        let effects = plan.step(exited("j", "a", false, false));
        assert!(matches!(effects[..], [Effect::Report { attempt: 1, .. }]), "{effects:?}");
        assert!(plan.step(Input::Deploy(vec![pending("j", "a")])).is_empty());
        assert!(plan.step(Input::Deploy(vec![restarted("j", "a", 1)])).is_empty());
        assert_eq!(show(&plan.step(Input::Deploy(vec![restarted("j", "a", 2)]))), ["start a"]);
    }

    #[test]
    fn an_adopted_worker_is_not_started_twice() {
        let mut plan = Plan::new(2);
        plan.step(Input::Adopted { job: JobId::new("j"), task: TaskId::new("a"), attempt: 1 });
        assert_eq!(plan.active(), 1);
        // The restarted controller re-sends the deploy of attempt 1: nothing to do.
        assert!(plan.step(Input::Deploy(vec![restarted("j", "a", 1)])).is_empty());
        // Its end is reported for attempt 1 when it dies unreported.
        let effects = plan.step(exited("j", "a", false, false));
        assert!(matches!(effects[..], [Effect::Report { attempt: 1, .. }]), "{effects:?}");
    }
}
