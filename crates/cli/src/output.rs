//! Rendering data for stdout: tables (comfy-table, no terminal-width dependence so output is
//! stable in pipes and snapshots), JSON and YAML.

use std::collections::BTreeSet;
use std::io::Write;

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

use fledge_client::JobStatus;
use fledge_types::{Compute, Dataset, Design, Job, MetricRecord, Task, User};

use crate::args::Format;

/// Writes `text` to stdout (a broken pipe surfaces as an `io::Error` that `main` treats as success).
pub fn emit(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()
}

/// Writes `lines`, one a line.
pub fn emit_lines(lines: &[String]) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    emit(&lines.join("\n"))
}

/// Renders `value` in `format` (`table` and `wide` use `table`); `name` is refused, as only
/// resource lists have names (see [`names`]).
pub fn render<T: Serialize + ?Sized>(
    value: &T,
    format: Format,
    table: impl FnOnce() -> String,
) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table | Format::Wide => table(),
        Format::Json => serde_json::to_string_pretty(value)?,
        Format::Yaml => serde_norway::to_string(value)?,
        Format::Name => {
            return Err(crate::input::InputError::Other(
                "-o name prints resources (designs, datasets, jobs, tasks, ...); this command \
                 shows none: use -o table, wide, json or yaml"
                    .to_owned(),
            )
            .into());
        }
    })
}

/// A resource that `-o name` prints as `KIND/ID`.
pub trait Named {
    /// The kind, as `get` names it (`job`, `task`, ...).
    const KIND: &'static str;
    /// Its id.
    fn id(&self) -> String;
}

macro_rules! named {
    ($type:ty, $kind:literal, |$it:ident| $id:expr) => {
        impl Named for $type {
            const KIND: &'static str = $kind;
            fn id(&self) -> String {
                let $it = self;
                $id.to_string()
            }
        }
    };
}

named!(Design, "design", |d| d.id);
named!(Dataset, "dataset", |d| d.id);
named!(Job, "job", |j| j.id);
named!(Task, "task", |t| t.task_id);
named!(Compute, "compute", |c| c.compute_id);
named!(User, "user", |u| u.id);
named!(fledge_types::Token, "token", |t| t.id);

/// `KIND/ID` of each item.
pub fn names<T: Named>(items: &[T]) -> Vec<String> {
    items.iter().map(|item| format!("{}/{}", T::KIND, item.id())).collect()
}

/// What a table shows beyond its data: whether `-o wide` asked for more columns, and the time
/// ages are measured to.
#[derive(Clone, Copy, Debug)]
pub struct Columns {
    /// `-o wide`.
    pub wide: bool,
    /// Now, for AGE columns.
    pub now: chrono::DateTime<chrono::Utc>,
}

/// The time from `then` to `now` like kubectl's AGE: `45s`, `3m`, `5h`, `4d`, `2y` (`0s` for
/// a time in the future, i.e. clock skew).
pub fn age(then: chrono::DateTime<chrono::Utc>, now: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (now - then).num_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3_600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3_600),
        s if s < 365 * 86_400 => format!("{}d", s / 86_400),
        s => format!("{}y", s / (365 * 86_400)),
    }
}

/// [`age`] of an optional time, `-` when absent.
fn age_or_dash(
    then: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    then.map_or_else(|| "-".to_owned(), |then| age(then, now))
}

/// A borderless, left-aligned table like kubectl's.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(|h| h.to_string()));
    for row in rows {
        table.add_row(row);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let text = table.to_string();
    let mut res: String = text.lines().map(str::trim_end).collect::<Vec<_>>().join("\n");
    res.push('\n');
    res
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".to_owned() } else { s.to_owned() }
}

/// Designs.
pub fn designs(items: &[Design], cols: Columns) -> String {
    let rows = items
        .iter()
        .map(|d| {
            let mut row = vec![
                d.id.to_string(),
                d.name.clone(),
                or_dash(d.schema_versions.last().map(String::as_str).unwrap_or("")),
                or_dash(d.code_versions.last().map(String::as_str).unwrap_or("")),
                age(d.created_at, cols.now),
            ];
            if cols.wide {
                row.push(time(&d.created_at));
            }
            row
        })
        .collect();
    let mut header = vec!["ID", "NAME", "SCHEMA", "CODE", "AGE"];
    if cols.wide {
        header.push("CREATED");
    }
    table(&header, rows)
}

/// Datasets.
pub fn datasets(items: &[Dataset]) -> String {
    let rows = items
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.spec.name.clone(),
                d.spec.realm.clone(),
                or_dash(&d.spec.data_format),
                if d.spec.is_public { "yes" } else { "no" }.to_owned(),
                d.spec.url.clone(),
            ]
        })
        .collect();
    table(&["ID", "NAME", "REALM", "FORMAT", "PUBLIC", "URL"], rows)
}

/// Jobs: `-o wide` adds the owner, the schema and code revisions and the absolute times.
pub fn jobs(items: &[Job], cols: Columns) -> String {
    let rows = items
        .iter()
        .map(|j| {
            let mut row = vec![
                j.id.to_string(),
                j.spec.name.clone(),
                j.spec.design_id.to_string(),
                j.state.to_string(),
                age(j.created_at, cols.now),
            ];
            if cols.wide {
                row.extend([
                    j.owner.to_string(),
                    j.schema_version.clone(),
                    j.code_version.clone(),
                    time(&j.created_at),
                    j.started_at.as_ref().map_or_else(|| "-".to_owned(), time),
                    j.ended_at.as_ref().map_or_else(|| "-".to_owned(), time),
                ]);
            }
            row.push(or_dash(j.reason.as_deref().unwrap_or("")));
            row
        })
        .collect();
    let mut header = vec!["ID", "NAME", "DESIGN", "STATE", "AGE"];
    if cols.wide {
        header.extend(["OWNER", "SCHEMA", "CODE", "CREATED", "STARTED", "ENDED"]);
    }
    header.push("REASON");
    table(&header, rows)
}

fn groups(task: &Task) -> String {
    task.group_association
        .iter()
        .map(|(channel, group)| format!("{channel}={group}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Who runs a task: `platform` (managed: a deployer starts its worker) or `participant` (its
/// data owner starts the agent; see `fledgectl job join`).
pub fn run_by(task: &Task) -> &'static str {
    if task.managed { "platform" } else { "participant" }
}

/// Tasks (with their states): `-o wide` adds how long ago each last beat and changed.
pub fn tasks(items: &[Task], cols: Columns) -> String {
    let rows = items
        .iter()
        .map(|t| {
            let mut row = vec![
                t.task_id.to_string(),
                t.role.clone(),
                t.index.to_string(),
                groups(t),
                or_dash(t.dataset_id.as_ref().map(|d| d.as_str()).unwrap_or("")),
                t.compute_id.to_string(),
                run_by(t).to_owned(),
                t.state.to_string(),
                t.restarts.to_string(),
            ];
            if cols.wide {
                row.push(age_or_dash(t.last_heartbeat, cols.now));
                row.push(age_or_dash(t.updated_at, cols.now));
            }
            row
        })
        .collect();
    let mut header = vec![
        "TASK", "ROLE", "INDEX", "GROUPS", "DATASET", "COMPUTE", "RUN BY", "STATE", "RESTARTS",
    ];
    if cols.wide {
        header.extend(["HEARTBEAT", "UPDATED"]);
    }
    table(&header, rows)
}

/// The `get models` table.
pub fn models(items: &[fledge_types::ModelFile]) -> String {
    let rows = items
        .iter()
        .map(|m| {
            vec![
                or_dash(m.group.as_deref().unwrap_or("")),
                m.round.map_or_else(|| "final".to_owned(), |r| r.to_string()),
                m.size.to_string(),
            ]
        })
        .collect();
    table(&["GROUP", "ROUND", "BYTES"], rows)
}

/// What `fledgectl job join` says to the data owner of one participant-run task.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinCommand {
    /// The task.
    pub task_id: String,
    /// Its role.
    pub role: String,
    /// Its index among the role's tasks.
    pub index: u32,
    /// The dataset it trains on, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<String>,
    /// Where it stands: waiting for its data owner, joined, or its task state.
    pub status: String,
    /// The shell command its data owner runs, with the key minted by this call (a placeholder
    /// when the key was minted earlier: it is shown only once).
    pub command: String,
}

/// Placeholder for a key minted earlier in a join command.
pub const KEY_PLACEHOLDER: &str = "<the-key-minted-earlier>";

/// What data owners need to know about their join command.
pub const JOIN_TIP: &str = "Give each data owner the line of their task, privately: its key \
     (FLEDGE_TASK_KEY) is shown once and stored only hashed. The same key rejoins the task after \
     a restart; any other key is refused. `fledgectl job join JOB --remint TASK` replaces a lost \
     or leaked key, `fledgectl job revoke-key JOB TASK` withdraws it.";

/// The join command of each participant-run task in `info`, with the keys `minted` by this call;
/// the apiserver's advertised URL, else `endpoint` (the one this CLI uses).
pub fn join_commands(
    info: &fledge_client::JoinInfo,
    endpoint: &str,
    minted: &std::collections::BTreeMap<fledge_types::TaskId, String>,
) -> Vec<JoinCommand> {
    let apiserver = info.apiserver.as_deref().unwrap_or(endpoint);
    // The agent fetches the CA and checks it against this: nothing to copy by hand.
    let ca = info
        .ca_fingerprint
        .as_deref()
        .map(|fingerprint| format!(" --ca-fingerprint {fingerprint}"))
        .unwrap_or_default();
    info.tasks
        .iter()
        .map(|task| {
            let mut status = match task.state {
                fledge_types::TaskState::Ready if task.last_heartbeat.is_none() => {
                    "waiting for its data owner".to_owned()
                }
                fledge_types::TaskState::Ready => "joined; starts with the job".to_owned(),
                state => state.to_string(),
            };
            let key = match minted.get(&task.task_id) {
                Some(key) => key.as_str(),
                None if info.keyed.contains(&task.task_id) => {
                    status.push_str("; key minted earlier (--remint replaces it)");
                    KEY_PLACEHOLDER
                }
                None => {
                    status.push_str("; no key (--remint mints one)");
                    KEY_PLACEHOLDER
                }
            };
            JoinCommand {
                task_id: task.task_id.to_string(),
                role: task.role.clone(),
                index: task.index,
                dataset_id: task.dataset_id.as_ref().map(ToString::to_string),
                status,
                command: format!(
                    "FLEDGE_TASK_KEY={key} fledge fledgelet --apiserver {apiserver}{ca} \
                     --task-id {id} --work-dir fledge-{id}",
                    id = task.task_id
                ),
            }
        })
        .collect()
}

/// Join commands as text: a comment line per task, then its command.
pub fn join_table(commands: &[JoinCommand]) -> String {
    let mut res = String::new();
    for command in commands {
        res.push_str(&format!(
            "# task {} ({} {}{}): {}\n{}\n",
            command.task_id,
            command.role,
            command.index,
            command.dataset_id.as_deref().map(|d| format!(", dataset {d}")).unwrap_or_default(),
            command.status,
            command.command
        ));
    }
    res
}

/// The expansion of a job (`job plan`): tasks without states, then a per-role count.
pub fn plan(items: &[Task]) -> String {
    let rows = items
        .iter()
        .map(|t| {
            vec![
                t.role.clone(),
                t.index.to_string(),
                groups(t),
                or_dash(t.dataset_id.as_ref().map(|d| d.as_str()).unwrap_or("")),
                t.compute_id.to_string(),
                t.task_id.to_string(),
            ]
        })
        .collect();
    table(&["ROLE", "INDEX", "GROUPS", "DATASET", "COMPUTE", "TASK"], rows)
}

/// `trainer: 4, middle-aggregator: 2, ...` in order of first appearance.
pub fn role_counts(items: &[Task]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for task in items {
        match counts.iter_mut().find(|(role, _)| *role == task.role) {
            Some((_, n)) => *n += 1,
            None => counts.push((task.role.clone(), 1)),
        }
    }
    counts.iter().map(|(role, n)| format!("{role}: {n}")).collect::<Vec<_>>().join(", ")
}

/// Whether a metric is a per-channel figure (`channel.<name>.bytesSent`, ...): many columns
/// of traffic counters, shown only by `-o wide`.
pub fn is_channel_metric(name: &str) -> bool {
    name.starts_with("channel.")
}

/// Metrics: one row per record, one column per metric name seen (per-channel figures only
/// with `wide`).
pub fn metrics(items: &[MetricRecord], wide: bool) -> String {
    let names: BTreeSet<&str> = items
        .iter()
        .flat_map(|r| r.metrics.keys().map(String::as_str))
        .filter(|name| wide || !is_channel_metric(name))
        .collect();
    let mut header = vec!["ROUND", "ROLE", "TASK"];
    let upper: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    header.extend(upper.iter().map(String::as_str));
    let rows = items
        .iter()
        .map(|r| {
            let mut row = vec![r.round.to_string(), r.role.clone(), r.task_id.to_string()];
            row.extend(names.iter().map(|name| match r.metrics.get(*name) {
                Some(v) => format_metric(*v),
                None => "-".to_owned(),
            }));
            row
        })
        .collect();
    table(&header, rows)
}

/// A metric value with 4 significant decimals, integers without decimals.
pub fn format_metric(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.4}") }
}

/// A job's status.
pub fn status(status: &JobStatus) -> String {
    let counts =
        status.tasks.iter().map(|(state, n)| format!("{state}={n}")).collect::<Vec<_>>().join(" ");
    table(
        &["STATE", "TASKS", "REASON"],
        vec![vec![
            status.state.to_string(),
            or_dash(&counts),
            or_dash(status.reason.as_deref().unwrap_or("")),
        ]],
    )
}

/// Computes.
pub fn computes(items: &[Compute]) -> String {
    let rows = items
        .iter()
        .map(|c| {
            vec![
                c.compute_id.to_string(),
                c.region.clone(),
                serde_json::to_value(c.platform)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                if c.connected { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    table(&["ID", "REGION", "PLATFORM", "CONNECTED"], rows)
}

/// Users.
pub fn users(items: &[User]) -> String {
    let rows = items
        .iter()
        .map(|u| vec![u.id.to_string(), if u.is_admin { "yes" } else { "no" }.to_owned()])
        .collect();
    table(&["ID", "ADMIN"], rows)
}

/// Tokens (`token list`): id, description, created, expiry (`expired` once past at `now`).
pub fn tokens(items: &[fledge_types::Token], now: chrono::DateTime<chrono::Utc>) -> String {
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%SZ").to_string();
    let rows = items
        .iter()
        .map(|t| {
            let expires = match t.expires_at {
                None => "never".to_owned(),
                Some(at) if at <= now => format!("{} (expired)", time(at)),
                Some(at) => time(at),
            };
            vec![t.id.clone(), or_dash(&t.description), time(t.created_at), expires]
        })
        .collect();
    table(&["ID", "DESCRIPTION", "CREATED", "EXPIRES"], rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use std::collections::BTreeMap;

    use expect_test::{Expect, expect};
    use fledge_types::{ComputeId, DatasetSpec, JobSpec, JobState, TaskId, TaskState};

    use super::*;

    fn check(actual: String, expect: Expect) {
        expect.assert_eq(&actual);
    }

    fn at() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap().to_utc()
    }

    fn task(role: &str, index: u32, groups: &[(&str, &str)], dataset: Option<&str>) -> Task {
        Task {
            job_id: "job-1".into(),
            task_id: TaskId::new(format!("{role}-{index}")),
            role: role.to_owned(),
            index,
            group_association: groups
                .iter()
                .map(|(c, g)| ((*c).to_owned(), (*g).to_owned()))
                .collect(),
            dataset_id: dataset.map(Into::into),
            compute_id: ComputeId::new("default"),
            managed: true,
            state: TaskState::Ready,
            log: String::new(),
            updated_at: None,
            last_heartbeat: None,
            restarts: 0,
        }
    }

    #[test]
    fn plan_and_task_tables() {
        let tasks = vec![
            task("trainer", 0, &[("param-channel", "eu")], Some("ds-uk")),
            task(
                "middle-aggregator",
                0,
                &[("param-channel", "eu"), ("global-channel", "default")],
                None,
            ),
            task("top-aggregator", 0, &[("global-channel", "default")], None),
        ];
        check(
            plan(&tasks),
            expect![[r#"
                ROLE               INDEX  GROUPS                                   DATASET  COMPUTE  TASK
                trainer            0      param-channel=eu                         ds-uk    default  trainer-0
                middle-aggregator  0      global-channel=default,param-channel=eu  -        default  middle-aggregator-0
                top-aggregator     0      global-channel=default                   -        default  top-aggregator-0
            "#]],
        );
        check(role_counts(&tasks), expect!["trainer: 1, middle-aggregator: 1, top-aggregator: 1"]);
        let mut owned = tasks[0].clone();
        owned.task_id = "trainer-1".into();
        owned.restarts = 2;
        owned.index = 1;
        owned.managed = false;
        let cols = |wide| Columns { wide, now: at() + chrono::Duration::seconds(95) };
        check(
            super::tasks(&[tasks[0].clone(), owned.clone()], cols(false)),
            expect![[r#"
                TASK       ROLE     INDEX  GROUPS            DATASET  COMPUTE  RUN BY       STATE  RESTARTS
                trainer-0  trainer  0      param-channel=eu  ds-uk    default  platform     ready  0
                trainer-1  trainer  1      param-channel=eu  ds-uk    default  participant  ready  2
            "#]],
        );
        let mut beating = owned.clone();
        beating.last_heartbeat = Some(at() + chrono::Duration::seconds(90));
        beating.updated_at = Some(at() - chrono::Duration::hours(3));
        check(
            super::tasks(&[tasks[0].clone(), beating], cols(true)),
            expect![[r#"
            TASK       ROLE     INDEX  GROUPS            DATASET  COMPUTE  RUN BY       STATE  RESTARTS  HEARTBEAT  UPDATED
            trainer-0  trainer  0      param-channel=eu  ds-uk    default  platform     ready  0         -          -
            trainer-1  trainer  1      param-channel=eu  ds-uk    default  participant  ready  2         5s         3h
        "#]],
        );

        // The join commands of participant-run tasks: the advertised apiserver wins; a key
        // minted by this call is in its command, one minted earlier is not shown again.
        let mut joined = owned.clone();
        joined.task_id = "trainer-2".into();
        joined.last_heartbeat = Some(at());
        let mut unkeyed = owned.clone();
        unkeyed.task_id = "trainer-3".into();
        let info = fledge_client::JoinInfo {
            apiserver: Some("http://10.0.0.1:10100".into()),
            notifier: None,
            ca_fingerprint: None,
            tasks: vec![owned, joined, unkeyed],
            keyed: vec!["trainer-1".into(), "trainer-2".into()],
        };
        let minted = BTreeMap::from([(TaskId::new("trainer-1"), "k1".to_owned())]);
        check(
            join_table(&join_commands(&info, "http://127.0.0.1:1", &minted)),
            expect![[r#"
                # task trainer-1 (trainer 1, dataset ds-uk): waiting for its data owner
                FLEDGE_TASK_KEY=k1 fledge fledgelet --apiserver http://10.0.0.1:10100 --task-id trainer-1 --work-dir fledge-trainer-1
                # task trainer-2 (trainer 1, dataset ds-uk): joined; starts with the job; key minted earlier (--remint replaces it)
                FLEDGE_TASK_KEY=<the-key-minted-earlier> fledge fledgelet --apiserver http://10.0.0.1:10100 --task-id trainer-2 --work-dir fledge-trainer-2
                # task trainer-3 (trainer 1, dataset ds-uk): waiting for its data owner; no key (--remint mints one)
                FLEDGE_TASK_KEY=<the-key-minted-earlier> fledge fledgelet --apiserver http://10.0.0.1:10100 --task-id trainer-3 --work-dir fledge-trainer-3
            "#]],
        );
        let info = fledge_client::JoinInfo { apiserver: None, ..info };
        assert!(
            join_commands(&info, "http://127.0.0.1:1", &minted)[0]
                .command
                .contains("--apiserver http://127.0.0.1:1 ")
        );
        // Over TLS the command carries the CA's fingerprint, so the agent fetches and checks it.
        let info = fledge_client::JoinInfo {
            apiserver: Some("https://10.0.0.1:10100".into()),
            ca_fingerprint: Some("sha256:00ff".into()),
            ..info
        };
        assert!(
            join_commands(&info, "https://127.0.0.1:1", &minted)[0].command.contains(
                "--apiserver https://10.0.0.1:10100 --ca-fingerprint sha256:00ff --task-id"
            )
        );

        let token = |id: &str, expires_at| fledge_types::Token {
            id: id.into(),
            user: "ann".into(),
            description: if id == "t1" { "ci".into() } else { String::new() },
            created_at: at(),
            expires_at,
        };
        check(
            super::tokens(
                &[
                    token("t1", None),
                    token("t2", Some(at() + chrono::Duration::hours(1))),
                    token("t3", Some(at())),
                ],
                at(),
            ),
            expect![[r#"
                ID  DESCRIPTION  CREATED               EXPIRES
                t1  ci           2026-01-02 03:04:05Z  never
                t2  -            2026-01-02 03:04:05Z  2026-01-02 04:04:05Z
                t3  -            2026-01-02 03:04:05Z  2026-01-02 03:04:05Z (expired)
            "#]],
        );
    }

    #[test]
    fn job_dataset_and_metric_tables() {
        let job = Job {
            id: "job-1".into(),
            owner: "alice".into(),
            spec: JobSpec { name: "mnist".into(), design_id: "hier".into(), ..Default::default() },
            schema_version: "1".into(),
            code_version: "1".into(),
            state: JobState::Failed,
            reason: Some("all trainer tasks failed".into()),
            created_at: at(),
            started_at: None,
            updated_at: at(),
            ended_at: None,
        };
        let now = at() + chrono::Duration::days(2) + chrono::Duration::hours(5);
        check(
            jobs(std::slice::from_ref(&job), Columns { wide: false, now }),
            expect![[r#"
                ID     NAME   DESIGN  STATE   AGE  REASON
                job-1  mnist  hier    failed  2d   all trainer tasks failed
            "#]],
        );
        let started = Job { started_at: Some(at()), ..job.clone() };
        check(
            jobs(&[started], Columns { wide: true, now }),
            expect![[r#"
            ID     NAME   DESIGN  STATE   AGE  OWNER  SCHEMA  CODE  CREATED              STARTED              ENDED  REASON
            job-1  mnist  hier    failed  2d   alice  1       1     2026-01-02 03:04:05  2026-01-02 03:04:05  -      all trainer tasks failed
        "#]],
        );
        check(names(&[job]).join("\n"), expect!["job/job-1"]);
        let dataset = Dataset {
            id: "ds-1".into(),
            owner: "alice".into(),
            spec: DatasetSpec {
                name: "uk".into(),
                url: "file:///d/uk.csv".into(),
                realm: "default/eu/uk".into(),
                ..Default::default()
            },
        };
        check(
            datasets(&[dataset]),
            expect![[r#"
                ID    NAME  REALM          FORMAT  PUBLIC  URL
                ds-1  uk    default/eu/uk  -       no      file:///d/uk.csv
            "#]],
        );
        let record = |round, role: &str, metrics: &[(&str, f64)]| MetricRecord {
            task_id: TaskId::new(format!("{role}-0")),
            role: role.to_owned(),
            round,
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect::<BTreeMap<_, _>>(),
            timestamp: None,
        };
        let records = [
            record(1, "trainer", &[("loss", 0.53125), ("bytesSent", 4096.0)]),
            record(1, "top-aggregator", &[("accuracy", 0.9), ("channel.global.bytesSent", 7e6)]),
        ];
        check(
            metrics(&records, true),
            expect![[r#"
            ROUND  ROLE            TASK              accuracy  bytesSent  channel.global.bytesSent  loss
            1      trainer         trainer-0         -         4096       -                         0.5312
            1      top-aggregator  top-aggregator-0  0.9000    -          7000000                   -
        "#]],
        );
        check(
            metrics(&records, false),
            expect![[r#"
                ROUND  ROLE            TASK              accuracy  bytesSent  loss
                1      trainer         trainer-0         -         4096       0.5312
                1      top-aggregator  top-aggregator-0  0.9000    -          -
            "#]],
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = at();
        let ago = |secs: i64| age(now - chrono::Duration::seconds(secs), now);
        assert_eq!(
            [ago(0), ago(59), ago(60), ago(3_599), ago(3_600), ago(86_399), ago(86_400)],
            ["0s", "59s", "1m", "59m", "1h", "23h", "1d"]
        );
        assert_eq!([ago(400 * 86_400), ago(-30)], ["1y", "0s"]);
    }

    #[test]
    fn name_output_is_refused_where_there_are_no_resources() {
        let err = render(&1, Format::Name, String::new).unwrap_err().to_string();
        assert!(err.contains("-o name"), "{err}");
        assert_eq!(render(&1, Format::Wide, || "t".to_owned()).unwrap(), "t");
    }

    #[test]
    fn json_and_yaml_are_the_dtos() {
        let status = JobStatus {
            state: JobState::Running,
            reason: None,
            tasks: [("running".to_owned(), 7)].into_iter().collect(),
        };
        let json = render(&status, Format::Json, || unreachable!()).unwrap();
        let back: JobStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, status);
        let yaml = render(&status, Format::Yaml, || unreachable!()).unwrap();
        check(
            yaml,
            expect![[r#"
                state: running
                tasks:
                  running: 7
            "#]],
        );
        check(
            super::status(&status),
            expect![[r#"
                STATE    TASKS      REASON
                running  running=7  -
            "#]],
        );
    }
}
