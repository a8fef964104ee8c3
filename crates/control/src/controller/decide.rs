//! The job state machine as a pure function: what to do next for one job, given the job, its
//! tasks, what this controller has already sent for it, and the time.
//!
//! [`decide`] does no I/O. The controller's run loop executes the returned [`Effect`]s in order
//! and stops at the first one that fails, so a state transition listed before an action is
//! persisted (compare-and-set) before the action happens. The decision is level-triggered: it
//! looks only at the current state, so running it twice is harmless.

use std::time::Duration;

use chrono::{DateTime, Utc};

use fledge_types::{Job, JobState, RestartPolicy, Task, TaskId, TaskState};

/// Reason recorded on a job that ran past its `maxRunTime`.
pub const REASON_MAX_RUN_TIME: &str = "maxRunTime";
/// Reason recorded on a job the user stopped.
pub const REASON_USER_STOP: &str = "stopped by user";

/// Timers of the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Longest wait before a job is looked at again.
    pub resync_interval: Duration,
    /// A running task without a heartbeat for this long is failed ("agent lost"); zero disables.
    pub heartbeat_timeout: Duration,
    /// How long a stopping job waits for its tasks before marking them terminated.
    pub stop_grace: Duration,
    /// A deploying job with a managed task whose agent never beat after this long fails,
    /// naming the computes that did not start them; zero disables.
    pub deploy_timeout: Duration,
}

/// What this controller has already sent for a job (lost on restart, which re-sends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Deploy events were published.
    pub deployed: bool,
    /// Start events were published.
    pub started: bool,
    /// Stop and revoke events were published.
    pub revoked: bool,
}

/// One thing the run loop must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Expand the job into tasks (one random key each) and store them (idempotent).
    Expand,
    /// Compare-and-set the job's state from `from` to `to`.
    Transition {
        /// Expected current state.
        from: JobState,
        /// New state.
        to: JobState,
        /// Reason recorded on the job.
        reason: Option<String>,
    },
    /// Send a deploy event per compute for its managed `ready` tasks (their workers come up
    /// and wait for their start event).
    Deploy,
    /// Send a start event to every `ready` task.
    Start,
    /// Put failed tasks back to `ready` for a new worker (compare-and-set on their restart
    /// count) and drop the events their previous worker was sent.
    Restart(Vec<Restart>),
    /// Send a start event to these tasks (restarted ones, once the job has started).
    StartTasks(Vec<TaskId>),
    /// Record why the job waits, without changing its state (compare-and-set on the state).
    Note {
        /// The job's current state.
        state: JobState,
        /// The reason recorded.
        reason: String,
    },
    /// Send stop events to these tasks.
    Stop(Vec<TaskId>),
    /// Send a revoke event (all of the job's workers) to every compute hosting managed tasks.
    Revoke,
    /// Set these tasks' state with `log` as their log tail.
    MarkTasks {
        /// The tasks.
        tasks: Vec<TaskId>,
        /// Their new state.
        state: TaskState,
        /// The log line recorded.
        log: String,
    },
    /// The job is over: drop its notifier mailboxes and this controller's memory of it.
    Forget,
}

/// One task to redeploy after a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restart {
    /// The task.
    pub task: TaskId,
    /// Its restarts so far (the compare-and-set's expected value).
    pub restarts: u32,
    /// Its new log tail: which restart this is and why.
    pub log: String,
}

/// When to look at the job again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// After this long (zero: right after the effects ran).
    Requeue(Duration),
    /// Only when woken (the job changed) or at the periodic resync.
    AwaitChange,
}

/// The effects to run and when to come back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// In order; the run loop stops at the first failure.
    pub effects: Vec<Effect>,
    /// When to reconcile the job again.
    pub action: Action,
}

impl Decision {
    fn now(effects: Vec<Effect>) -> Self {
        Self { effects, action: Action::Requeue(Duration::ZERO) }
    }
}

/// Decides the next step of `job`, whose tasks are `tasks`, at `now`.
pub fn decide(
    job: &Job,
    tasks: &[Task],
    memory: Memory,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Decision {
    let state = job.state;
    match state {
        JobState::Ready => Decision { effects: Vec::new(), action: Action::AwaitChange },
        JobState::Completed | JobState::Failed | JobState::Terminated => {
            // A final job keeps no live tasks: finish a cleanup an earlier run did not complete
            // (ending marks the tasks last, so live tasks mean the stop and revoke may be lost).
            let live = non_final(tasks);
            let effects = if live.is_empty() {
                Vec::new()
            } else {
                vec![
                    Effect::Stop(live.clone()),
                    Effect::Revoke,
                    Effect::MarkTasks {
                        tasks: live,
                        state: TaskState::Terminated,
                        log: format!("job {state}"),
                    },
                    Effect::Forget,
                ]
            };
            Decision { effects, action: Action::AwaitChange }
        }
        JobState::Starting => Decision::now(vec![
            Effect::Expand,
            Effect::Transition { from: JobState::Starting, to: JobState::Deploying, reason: None },
            Effect::Deploy,
        ]),
        JobState::Stopping => decide_stopping(job, tasks, memory, policy, now),
        JobState::Deploying | JobState::Running => decide_active(job, tasks, memory, policy, now),
    }
}

fn decide_active(
    job: &Job,
    tasks: &[Task],
    memory: Memory,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Decision {
    let state = job.state;

    // 1. Agents that stopped beating are failed first; the outcome is judged on the next pass.
    let lost = lost_tasks(tasks, policy.heartbeat_timeout, now);
    if !lost.is_empty() {
        return Decision::now(vec![
            Effect::MarkTasks {
                tasks: lost.clone(),
                state: TaskState::Failed,
                log: format!(
                    "agent lost: no heartbeat for {}s",
                    policy.heartbeat_timeout.as_secs()
                ),
            },
            Effect::Stop(lost),
        ]);
    }

    // 2. Failed platform-run tasks that their role's restart policy lets go on get a new
    // worker; the job's outcome counts them as failed only once their restarts are spent.
    let restart = restartable(job, tasks);
    if !restart.is_empty() {
        let why: Vec<String> = restart.iter().map(|r| format!("{}: {}", r.task, r.log)).collect();
        return Decision::now(vec![
            Effect::Restart(restart),
            Effect::Note { state, reason: format!("restarting {}", why.join("; ")) },
        ]);
    }

    // 3. The tasks' outcome ends the job.
    if let Some((to, reason)) = outcome(tasks) {
        return Decision::now(end(state, to, reason, tasks));
    }

    // 4. The wall-time limit.
    let deadline = max_run_deadline(job);
    if deadline.is_some_and(|deadline| now >= deadline) {
        return Decision::now(vec![Effect::Transition {
            from: state,
            to: JobState::Stopping,
            reason: Some(REASON_MAX_RUN_TIME.to_owned()),
        }]);
    }

    // 5. Progress: deploy the managed tasks; once every participant-run task has joined (its
    // data owner's agent beats), start every task; `running` once no task is `ready`. The
    // deploy timeout catches managed workers that never came up (no agent ever beat), e.g. a
    // compute without a working deployer; waiting for data owners is bounded by maxRunTime.
    let deploy_deadline = (state == JobState::Deploying && !policy.deploy_timeout.is_zero())
        .then(|| job.updated_at + policy.deploy_timeout);
    if deploy_deadline.is_some_and(|deadline| now >= deadline) {
        let mut computes: Vec<&str> = tasks
            .iter()
            .filter(|t| t.managed && t.state == TaskState::Ready && t.last_heartbeat.is_none())
            .map(|t| t.compute_id.as_str())
            .collect();
        computes.sort_unstable();
        computes.dedup();
        if !computes.is_empty() {
            let reason = format!(
                "tasks not started within {:?} on compute {} (is its deployer running?)",
                policy.deploy_timeout,
                computes.join(", ")
            );
            return Decision::now(end(state, JobState::Failed, Some(reason), tasks));
        }
    }
    let mut effects = Vec::new();
    if state == JobState::Running {
        // Restarted tasks wait in `ready` until their new worker runs: (re-)send their deploy
        // and start events on every pass (deployers start one worker per attempt).
        let restarted: Vec<TaskId> = tasks
            .iter()
            .filter(|t| t.managed && t.state == TaskState::Ready)
            .map(|t| t.task_id.clone())
            .collect();
        if !restarted.is_empty() {
            effects.extend([Effect::Deploy, Effect::StartTasks(restarted)]);
        }
    }
    if state == JobState::Deploying {
        if !memory.deployed {
            effects.push(Effect::Deploy);
        }
        let waiting = waiting_for_owners(tasks, policy.heartbeat_timeout, now);
        if waiting.is_empty() {
            if !memory.started {
                effects.push(Effect::Start);
            }
        } else {
            let reason = waiting_reason(&job.id, &waiting);
            if job.reason.as_deref() != Some(reason.as_str()) {
                effects.push(Effect::Note { state, reason });
            }
        }
        let all_up = tasks.iter().all(|t| t.state != TaskState::Ready);
        if all_up {
            effects.push(Effect::Transition {
                from: JobState::Deploying,
                to: JobState::Running,
                reason: None,
            });
        }
    }

    // 6. Come back at the next timer: heartbeat expiry, wall-time limit, or the resync.
    let mut wait = policy.resync_interval;
    if let Some(deadline) = deadline {
        wait = wait.min(until(now, deadline));
    }
    if let Some(expiry) = next_heartbeat_expiry(tasks, policy.heartbeat_timeout) {
        wait = wait.min(until(now, expiry));
    }
    // Past the deploy deadline with every managed worker up, only the resync remains.
    if let Some(deadline) = deploy_deadline.filter(|deadline| now < *deadline) {
        wait = wait.min(until(now, deadline));
    }
    let action = if effects.iter().any(|e| matches!(e, Effect::Transition { .. })) {
        Action::Requeue(Duration::ZERO)
    } else {
        Action::Requeue(wait)
    };
    Decision { effects, action }
}

fn decide_stopping(
    job: &Job,
    tasks: &[Task],
    memory: Memory,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Decision {
    let reason = Some(job.reason.clone().unwrap_or_else(|| REASON_USER_STOP.to_owned()));
    let live = non_final(tasks);
    let mut effects = Vec::new();
    if !memory.revoked {
        if !live.is_empty() {
            effects.push(Effect::Stop(live.clone()));
        }
        effects.push(Effect::Revoke);
    }
    let terminate =
        Effect::Transition { from: JobState::Stopping, to: JobState::Terminated, reason };
    // The job entered `stopping` at its last state change.
    let grace_end = job.updated_at + policy.stop_grace;
    if live.is_empty() {
        effects.extend([terminate, Effect::Forget]);
        return Decision::now(effects);
    }
    if now >= grace_end {
        // Stop and revoke went out on entering `stopping`, so both writes here only record:
        // the tasks first, so that a job read as final never shows live tasks. A restart
        // between the two finds no live task and terminates the job above.
        effects.extend([
            Effect::MarkTasks {
                tasks: live,
                state: TaskState::Terminated,
                log: format!(
                    "not stopped within the stop grace of {}s",
                    policy.stop_grace.as_secs()
                ),
            },
            terminate,
            Effect::Forget,
        ]);
        return Decision::now(effects);
    }
    Decision { effects, action: Action::Requeue(policy.resync_interval.min(until(now, grace_end))) }
}

/// The effects that end a job in `to`: persist, stop what still runs, revoke the workers,
/// record every remaining task as terminated, forget.
fn end(from: JobState, to: JobState, reason: Option<String>, tasks: &[Task]) -> Vec<Effect> {
    let live = non_final(tasks);
    let mut effects = vec![Effect::Transition { from, to, reason }];
    if !live.is_empty() {
        effects.push(Effect::Stop(live.clone()));
    }
    effects.push(Effect::Revoke);
    if !live.is_empty() {
        effects.push(Effect::MarkTasks {
            tasks: live,
            state: TaskState::Terminated,
            log: format!("job {to}"),
        });
    }
    effects.push(Effect::Forget);
    effects
}

/// Whether the tasks end the job: `failed` when every task of some role failed (or every task
/// ended and some role has no completed task), `completed` when no task runs and every role has
/// a completed task.
pub fn outcome(tasks: &[Task]) -> Option<(JobState, Option<String>)> {
    if tasks.is_empty() {
        return Some((JobState::Failed, Some("the job has no tasks".to_owned())));
    }
    let roles = roles(tasks);
    for role in &roles {
        let mut of_role = tasks.iter().filter(|t| &t.role == role);
        if of_role.all(|t| t.state == TaskState::Failed) {
            let mut reason = format!("all tasks of role {role} failed");
            // A task that was restarted: say so, and why it failed last.
            if let Some(t) = tasks.iter().find(|t| &t.role == role && t.restarts > 0) {
                reason.push_str(&format!(
                    " ({} after {} restart{}: {})",
                    t.task_id,
                    t.restarts,
                    if t.restarts == 1 { "" } else { "s" },
                    first_line(&t.log)
                ));
            }
            return Some((JobState::Failed, Some(reason)));
        }
    }
    let completed =
        |role: &String| tasks.iter().any(|t| &t.role == role && t.state == TaskState::Completed);
    let any_running = tasks.iter().any(|t| t.state == TaskState::Running);
    if !any_running && roles.iter().all(completed) {
        return Some((JobState::Completed, None));
    }
    if tasks.iter().all(|t| t.state.is_final()) {
        let role = roles
            .iter()
            .find(|r| !completed(r))
            .expect("some role lacks a completed task, else the job completed above");
        return Some((
            JobState::Failed,
            Some(format!("every task ended but role {role} has no completed task")),
        ));
    }
    None
}

/// The restart policy of `task` in `job`: the spec's entry for its role, else the default
/// of its kind (see [`RestartPolicy::default_for`]).
pub fn restart_policy(job: &Job, task: &Task) -> RestartPolicy {
    job.spec
        .restart_policy
        .get(&task.role)
        .copied()
        .unwrap_or_else(|| RestartPolicy::default_for(task.dataset_id.is_some()))
}

/// The failed platform-run tasks whose policy allows another restart.
fn restartable(job: &Job, tasks: &[Task]) -> Vec<Restart> {
    tasks
        .iter()
        .filter(|t| t.managed && t.state == TaskState::Failed)
        .filter_map(|t| {
            let policy = restart_policy(job, t);
            policy.allows(t.restarts).then(|| Restart {
                task: t.task_id.clone(),
                restarts: t.restarts,
                log: format!(
                    "restart {} of {} after: {}",
                    t.restarts + 1,
                    policy.max_restarts,
                    first_line(&t.log)
                ),
            })
        })
        .collect()
}

/// The first line of a log tail (a restart's reason), at most 200 characters.
fn first_line(log: &str) -> String {
    let line = log.lines().next().unwrap_or("").trim();
    let mut out: String = line.chars().take(200).collect();
    if out.is_empty() {
        out.push_str("no log");
    }
    out
}

/// Distinct roles in first-seen order.
fn roles(tasks: &[Task]) -> Vec<String> {
    let mut res: Vec<String> = Vec::new();
    for task in tasks {
        if !res.contains(&task.role) {
            res.push(task.role.clone());
        }
    }
    res
}

fn non_final(tasks: &[Task]) -> Vec<TaskId> {
    tasks.iter().filter(|t| !t.state.is_final()).map(|t| t.task_id.clone()).collect()
}

/// The last sign of life of a task: its latest heartbeat or state change. (An agent beats
/// while it waits for its start event, so a heartbeat may predate the `running` report.)
fn last_seen(task: &Task) -> Option<DateTime<Utc>> {
    task.last_heartbeat.max(task.updated_at)
}

/// The participant-run tasks still `ready` whose data owner's agent is not (or no longer)
/// connected: no heartbeat within `timeout` (with a zero timeout: no heartbeat ever).
fn waiting_for_owners(tasks: &[Task], timeout: Duration, now: DateTime<Utc>) -> Vec<&Task> {
    tasks
        .iter()
        .filter(|t| !t.managed && t.state == TaskState::Ready)
        .filter(|t| match t.last_heartbeat {
            None => true,
            Some(beat) => !timeout.is_zero() && now >= beat + timeout,
        })
        .collect()
}

/// The reason a job records while it waits for participant-run tasks.
pub fn waiting_reason(job: &fledge_types::JobId, waiting: &[&Task]) -> String {
    let names: Vec<String> =
        waiting.iter().map(|t| format!("{} ({} {})", t.task_id, t.role, t.index)).collect();
    format!(
        "waiting for {} participant-run task{} to join: {}; `fledgectl job join {job}` prints the command for each data owner",
        waiting.len(),
        if waiting.len() == 1 { "" } else { "s" },
        names.join(", ")
    )
}

fn lost_tasks(tasks: &[Task], timeout: Duration, now: DateTime<Utc>) -> Vec<TaskId> {
    if timeout.is_zero() {
        return Vec::new();
    }
    tasks
        .iter()
        .filter(|t| t.state == TaskState::Running)
        .filter(|t| last_seen(t).is_some_and(|seen| now >= seen + timeout))
        .map(|t| t.task_id.clone())
        .collect()
}

fn next_heartbeat_expiry(tasks: &[Task], timeout: Duration) -> Option<DateTime<Utc>> {
    if timeout.is_zero() {
        return None;
    }
    tasks
        .iter()
        .filter(|t| t.state == TaskState::Running)
        .filter_map(last_seen)
        .min()
        .map(|seen| seen + timeout)
}

fn max_run_deadline(job: &Job) -> Option<DateTime<Utc>> {
    let limit = job.spec.max_run_time;
    if limit == 0 {
        return None;
    }
    let started = job.started_at.unwrap_or(job.created_at);
    let limit = chrono::Duration::seconds(i64::try_from(limit).unwrap_or(i64::MAX / 1000));
    started.checked_add_signed(limit)
}

fn until(now: DateTime<Utc>, then: DateTime<Utc>) -> Duration {
    (then - now).to_std().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fledge_types::{ComputeId, DatasetId, DesignId, JobId, JobSpec, UserId};

    use super::*;

    const HB: Duration = Duration::from_secs(60);
    const GRACE: Duration = Duration::from_secs(30);
    const RESYNC: Duration = Duration::from_secs(10);
    const DEPLOY: Duration = Duration::from_secs(300);

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .expect("valid time")
            .with_timezone(&Utc)
    }

    fn at(secs: i64) -> DateTime<Utc> {
        t0() + chrono::Duration::seconds(secs)
    }

    fn job(state: JobState, max_run_time: u64) -> Job {
        Job {
            id: JobId::new("j1"),
            owner: UserId::new("alice"),
            spec: JobSpec {
                name: "j".to_owned(),
                design_id: DesignId::new("d"),
                max_run_time,
                ..JobSpec::default()
            },
            schema_version: "1".to_owned(),
            code_version: "1".to_owned(),
            state,
            reason: None,
            created_at: t0(),
            started_at: Some(t0()),
            updated_at: t0(),
            ended_at: None,
        }
    }

    /// `"trainer:running"` → a task of role `trainer` in state `running`, seen at t0.
    fn tasks(specs: &[&str]) -> Vec<Task> {
        specs
            .iter()
            .enumerate()
            .map(|(idx, spec)| {
                // An optional third field: the task's restarts so far.
                let mut fields = spec.split(':');
                let role = fields.next().expect("role");
                let state = fields.next().expect("role:state");
                let restarts = fields.next().map_or(0, |n| n.parse().expect("restart count"));
                Task {
                    job_id: JobId::new("j1"),
                    task_id: TaskId::new(format!("t{idx}")),
                    role: role.to_owned(),
                    index: u32::try_from(idx).expect("small"),
                    group_association: BTreeMap::new(),
                    // Trainers read a dataset (and never restart by default).
                    dataset_id: (role == "trainer").then(|| DatasetId::new(format!("d{idx}"))),
                    compute_id: ComputeId::new("default"),
                    managed: true,
                    state: state.parse().expect("task state"),
                    log: if state == "failed" { "exit 9\nmore".to_owned() } else { String::new() },
                    updated_at: Some(t0()),
                    last_heartbeat: None,
                    restarts,
                }
            })
            .collect()
    }

    fn policy() -> Policy {
        Policy {
            resync_interval: RESYNC,
            heartbeat_timeout: HB,
            stop_grace: GRACE,
            deploy_timeout: DEPLOY,
        }
    }

    /// Renders a decision compactly: effects joined by `; `, then the action.
    fn render(decision: &Decision) -> String {
        let ids = |ids: &[TaskId]| ids.iter().map(TaskId::as_str).collect::<Vec<_>>().join(",");
        let mut parts: Vec<String> = decision
            .effects
            .iter()
            .map(|effect| match effect {
                Effect::Expand => "expand".to_owned(),
                Effect::Transition { from, to, reason } => match reason {
                    Some(reason) => format!("{from}->{to} ({reason})"),
                    None => format!("{from}->{to}"),
                },
                Effect::Deploy => "deploy".to_owned(),
                Effect::Start => "start".to_owned(),
                Effect::Note { state, reason } => format!("note {state} ({reason})"),
                Effect::Restart(restarts) => {
                    let each: Vec<String> =
                        restarts.iter().map(|r| format!("{}#{}", r.task, r.restarts)).collect();
                    format!("restart[{}]", each.join(","))
                }
                Effect::StartTasks(tasks) => format!("start[{}]", ids(tasks)),
                Effect::Stop(tasks) => format!("stop[{}]", ids(tasks)),
                Effect::Revoke => "revoke".to_owned(),
                Effect::MarkTasks { tasks, state, log } => {
                    format!("mark[{}]={state} ({log})", ids(tasks))
                }
                Effect::Forget => "forget".to_owned(),
            })
            .collect();
        parts.push(match decision.action {
            Action::Requeue(wait) => format!("requeue {}s", wait.as_secs()),
            Action::AwaitChange => "await".to_owned(),
        });
        parts.join("; ")
    }

    struct Case {
        name: &'static str,
        state: JobState,
        max_run_time: u64,
        tasks: &'static [&'static str],
        memory: Memory,
        now: i64,
        expect: &'static str,
    }

    const FRESH: Memory = Memory { deployed: false, started: false, revoked: false };
    const SENT: Memory = Memory { deployed: true, started: true, revoked: false };
    const REVOKED: Memory = Memory { deployed: true, started: true, revoked: true };

    #[test]
    fn every_transition_as_a_table() {
        let cases = [
            Case {
                name: "ready waits for a start",
                state: JobState::Ready,
                max_run_time: 0,
                tasks: &[],
                memory: FRESH,
                now: 0,
                expect: "await",
            },
            Case {
                name: "starting expands, persists deploying, then deploys",
                state: JobState::Starting,
                max_run_time: 0,
                tasks: &[],
                memory: FRESH,
                now: 0,
                expect: "expand; starting->deploying; deploy; requeue 0s",
            },
            Case {
                name: "deploying after a restart re-sends deploy and start events",
                state: JobState::Deploying,
                max_run_time: 0,
                tasks: &["agg:ready", "trainer:ready"],
                memory: FRESH,
                now: 1,
                expect: "deploy; start; requeue 10s",
            },
            Case {
                name: "deploying waits for workers without re-sending",
                state: JobState::Deploying,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:ready"],
                memory: SENT,
                now: 1,
                expect: "requeue 10s",
            },
            Case {
                name: "deploying near the deploy timeout comes back at it",
                state: JobState::Deploying,
                max_run_time: 0,
                tasks: &["agg:ready", "trainer:ready"],
                memory: SENT,
                now: 295,
                expect: "requeue 5s",
            },
            Case {
                name: "deploying past the deploy timeout fails naming the compute",
                state: JobState::Deploying,
                max_run_time: 0,
                tasks: &["agg:ready", "trainer:ready"],
                memory: SENT,
                now: 300,
                expect: "deploying->failed (tasks not started within 300s on compute default (is its deployer running?)); stop[t0,t1]; revoke; mark[t0,t1]=terminated (job failed); forget; requeue 0s",
            },
            Case {
                name: "deploying becomes running once every task runs or ended",
                state: JobState::Deploying,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:running", "trainer:completed"],
                memory: SENT,
                now: 1,
                expect: "deploying->running; requeue 0s",
            },
            Case {
                name: "running waits for the next heartbeat expiry",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:running"],
                memory: SENT,
                now: 55,
                expect: "requeue 5s",
            },
            Case {
                name: "completed when nothing runs and every role completed",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:completed", "trainer:completed", "trainer:failed"],
                memory: SENT,
                now: 5,
                expect: "running->completed; revoke; forget; requeue 0s",
            },
            Case {
                name: "completed marks never-started tasks terminated",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:completed", "trainer:completed", "trainer:ready"],
                memory: SENT,
                now: 5,
                expect: "running->completed; stop[t2]; revoke; mark[t2]=terminated (job completed); forget; requeue 0s",
            },
            Case {
                name: "failed when every task of a role failed, the rest stopped",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:failed", "trainer:failed"],
                memory: SENT,
                now: 5,
                expect: "running->failed (all tasks of role trainer failed); stop[t0]; revoke; mark[t0]=terminated (job failed); forget; requeue 0s",
            },
            Case {
                name: "a role failing while deploying fails the job too",
                state: JobState::Deploying,
                max_run_time: 0,
                tasks: &["agg:failed:3", "trainer:ready"],
                memory: SENT,
                now: 5,
                expect: "deploying->failed (all tasks of role agg failed (t0 after 3 restarts: exit 9)); stop[t1]; revoke; mark[t1]=terminated (job failed); forget; requeue 0s",
            },
            Case {
                name: "a failed aggregator is restarted, by default up to 3 times",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:failed:2", "trainer:running"],
                memory: SENT,
                now: 5,
                expect: "restart[t0#2]; note running (restarting t0: restart 3 of 3 after: exit 9); requeue 0s",
            },
            Case {
                name: "a restarted task is deployed and started until it runs",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:ready:1", "trainer:running"],
                memory: SENT,
                now: 5,
                expect: "deploy; start[t0]; requeue 10s",
            },
            Case {
                name: "a failed trainer is not restarted by default",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:failed", "trainer:running"],
                memory: SENT,
                now: 5,
                expect: "requeue 10s",
            },
            Case {
                name: "every task ended without a completed aggregator",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:terminated", "trainer:completed"],
                memory: SENT,
                now: 5,
                expect: "running->failed (every task ended but role agg has no completed task); revoke; forget; requeue 0s",
            },
            Case {
                name: "a silent agent is failed and stopped",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:running"],
                memory: SENT,
                now: 60,
                expect: "mark[t0,t1]=failed (agent lost: no heartbeat for 60s); stop[t0,t1]; requeue 0s",
            },
            Case {
                name: "maxRunTime moves to stopping with its reason",
                state: JobState::Running,
                max_run_time: 30,
                tasks: &["agg:running", "trainer:running"],
                memory: SENT,
                now: 30,
                expect: "running->stopping (maxRunTime); requeue 0s",
            },
            Case {
                name: "before maxRunTime the requeue aims at it",
                state: JobState::Running,
                max_run_time: 30,
                tasks: &["agg:running", "trainer:running"],
                memory: SENT,
                now: 25,
                expect: "requeue 5s",
            },
            Case {
                name: "stopping sends stop and revoke once",
                state: JobState::Stopping,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:completed", "trainer:ready"],
                memory: SENT,
                now: 10,
                expect: "stop[t0,t2]; revoke; requeue 10s",
            },
            Case {
                name: "stopping waits within the grace",
                state: JobState::Stopping,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:completed"],
                memory: REVOKED,
                now: 25,
                expect: "requeue 5s",
            },
            Case {
                name: "stopping ends when every task is final",
                state: JobState::Stopping,
                max_run_time: 0,
                tasks: &["agg:terminated", "trainer:completed"],
                memory: REVOKED,
                now: 12,
                expect: "stopping->terminated (stopped by user); forget; requeue 0s",
            },
            Case {
                name: "stopping past the grace terminates the stragglers",
                state: JobState::Stopping,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:completed"],
                memory: REVOKED,
                now: 30,
                expect: "mark[t0]=terminated (not stopped within the stop grace of 30s); stopping->terminated (stopped by user); forget; requeue 0s",
            },
            Case {
                name: "stopping after a restart re-sends and may end at once",
                state: JobState::Stopping,
                max_run_time: 0,
                tasks: &[],
                memory: FRESH,
                now: 1,
                expect: "revoke; stopping->terminated (stopped by user); forget; requeue 0s",
            },
            Case {
                name: "a final job with live tasks is cleaned up",
                state: JobState::Failed,
                max_run_time: 0,
                tasks: &["agg:running", "trainer:failed"],
                memory: FRESH,
                now: 1,
                expect: "stop[t0]; revoke; mark[t0]=terminated (job failed); forget; await",
            },
            Case {
                name: "a final job with final tasks needs nothing",
                state: JobState::Completed,
                max_run_time: 0,
                tasks: &["agg:completed"],
                memory: FRESH,
                now: 1,
                expect: "await",
            },
            Case {
                name: "illegal: a running job without tasks fails",
                state: JobState::Running,
                max_run_time: 0,
                tasks: &[],
                memory: SENT,
                now: 1,
                expect: "running->failed (the job has no tasks); revoke; forget; requeue 0s",
            },
        ];
        let mut failures = Vec::new();
        for case in &cases {
            let decision = decide(
                &job(case.state, case.max_run_time),
                &tasks(case.tasks),
                case.memory,
                &policy(),
                at(case.now),
            );
            let got = render(&decision);
            if got != case.expect {
                failures.push(format!(
                    "{}:\n  expected: {}\n  got:      {got}",
                    case.name, case.expect
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn stopping_keeps_the_max_run_time_reason_and_heartbeats_count() {
        let mut stopping = job(JobState::Stopping, 30);
        stopping.reason = Some(REASON_MAX_RUN_TIME.to_owned());
        let decision = decide(&stopping, &tasks(&["a:failed"]), REVOKED, &policy(), at(1));
        assert_eq!(render(&decision), "stopping->terminated (maxRunTime); forget; requeue 0s");

        // A recent heartbeat keeps a task alive past its last state change.
        let mut running = tasks(&["agg:running", "trainer:running"]);
        for task in &mut running {
            task.last_heartbeat = Some(at(50));
        }
        let decision = decide(&job(JobState::Running, 0), &running, SENT, &policy(), at(70));
        assert_eq!(render(&decision), "requeue 10s");
        let decision = decide(&job(JobState::Running, 0), &running, SENT, &policy(), at(110));
        assert!(render(&decision).starts_with("mark[t0,t1]=failed"));

        // A zero timeout disables the heartbeat check.
        let no_hb = Policy { heartbeat_timeout: Duration::ZERO, ..policy() };
        let decision = decide(&job(JobState::Running, 0), &running, SENT, &no_hb, at(10_000));
        assert_eq!(render(&decision), "requeue 10s");
    }

    #[test]
    fn participant_run_tasks_hold_the_start_until_their_owners_join() {
        // The owner's agent has not beaten yet: managed workers are deployed, nobody starts,
        // the job says whom it waits for.
        let deployed = Memory { deployed: true, started: false, revoked: false };
        let mut list = tasks(&["agg:ready", "trainer:ready"]);
        list[1].managed = false;
        let decision = decide(&job(JobState::Deploying, 0), &list, FRESH, &policy(), at(1));
        assert_eq!(
            render(&decision),
            "deploy; note deploying (waiting for 1 participant-run task to join: t1 (trainer 1); `fledgectl job join j1` prints the command for each data owner); requeue 10s"
        );
        // Noted already: nothing to write again. Past the deploy timeout, the managed worker
        // that beats is up; only maxRunTime bounds the wait for the owner.
        let mut noted = job(JobState::Deploying, 0);
        noted.reason = Some(waiting_reason(&noted.id, &[&list[1]]));
        list[0].last_heartbeat = Some(at(1));
        let decision = decide(&noted, &list, deployed, &policy(), at(400));
        assert_eq!(render(&decision), "requeue 10s");
        let decision = decide(&job(JobState::Deploying, 500), &list, deployed, &policy(), at(500));
        assert_eq!(render(&decision), "deploying->stopping (maxRunTime); requeue 0s");

        // The owner's agent beats: every task starts; `running` once none is `ready`.
        list[1].last_heartbeat = Some(at(399));
        let decision = decide(&noted, &list, deployed, &policy(), at(400));
        assert_eq!(render(&decision), "start; requeue 10s");
        for task in &mut list {
            task.state = TaskState::Running;
            task.updated_at = Some(at(400));
        }
        let decision = decide(&noted, &list, SENT, &policy(), at(401));
        assert_eq!(render(&decision), "deploying->running; requeue 0s");

        // An agent that stopped beating before the start no longer counts as joined.
        for task in &mut list {
            task.state = TaskState::Ready;
        }
        let decision = decide(&noted, &list, deployed, &policy(), at(399 + 60));
        assert_eq!(render(&decision), "requeue 10s");
    }

    #[test]
    fn the_job_spec_sets_each_roles_restart_policy() {
        use fledge_types::{RestartOn, RestartPolicy};
        let failed = tasks(&["agg:failed:1", "trainer:failed", "trainer:running"]);
        // `never` for the aggregator: the job fails at once.
        let mut never = job(JobState::Running, 0);
        never
            .spec
            .restart_policy
            .insert("agg".to_owned(), RestartPolicy { policy: RestartOn::Never, max_restarts: 3 });
        let decision = decide(&never, &failed, SENT, &policy(), at(5));
        assert!(render(&decision).starts_with("running->failed (all tasks of role agg failed (t0"));
        // `onFailure` for trainers: the failed trainer comes back, within its bound.
        let mut trainers = job(JobState::Running, 0);
        trainers.spec.restart_policy.insert(
            "trainer".to_owned(),
            RestartPolicy { policy: RestartOn::OnFailure, max_restarts: 1 },
        );
        let decision = decide(&trainers, &failed, SENT, &policy(), at(5));
        assert!(
            render(&decision).starts_with("restart[t0#1,t1#0]; note running"),
            "{}",
            render(&decision)
        );
        let mut spent = failed.clone();
        spent[1].restarts = 1;
        let decision = decide(&trainers, &spent[1..], SENT, &policy(), at(5));
        assert_eq!(render(&decision), "requeue 10s");
    }
}
