//! Expansion: a job's schema, data spec and datasets become its tasks (`docs/design.md`, "Expansion").
//!
//! - A data-consuming role gets one task per dataset id listed for it in `dataSpec`; its group
//!   association is the role's `groupAssociation` entry that contains the dataset's group label,
//!   and its compute is the one whose `region` is the longest path-segment prefix of the
//!   dataset's `realm` (`default/eu` serves `default/eu/uk`), else compute `default`.
//! - Every other role gets `replica` tasks (at least 1) per `groupAssociation` entry, on compute
//!   `default`.
//! - A channel without `groupBy` has the single group `default`; a role entry that omits such a
//!   channel is in its `default` group, and a role with no entries at all has one implicit entry.
//! - Every non-data task must reach a data-consuming task through the task graph (two tasks are
//!   adjacent when a channel pairs their roles and both are in the same group of it), and every
//!   task must have a peer in its group of each channel it is in (self-loops aside); otherwise
//!   it would idle and keep the job running forever.
//!
//! Task ids are stable ([`task_id`]), so re-expanding a job yields the same ids, and the output
//! order is deterministic: roles in schema order, then entries, datasets and replicas in order.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use sha2::{Digest, Sha256};

use crate::error::ErrorDetail;
use crate::ids::{ComputeId, DatasetId, JobId, TaskId};
use crate::job::JobSpec;
use crate::resources::{Compute, Dataset};
use crate::schema::{Role, Schema};
use crate::state::TaskState;
use crate::task::Task;

/// The compute id of tasks that no registered compute's region serves (and of non-data tasks).
pub const DEFAULT_COMPUTE: &str = "default";

/// Expands a job into its tasks, or returns every problem that prevents it.
///
/// `datasets` holds (at least) every dataset the data spec names; `computes` are the registered
/// computes. Problems are reported with paths into the job spec (`dataSpec[0].role`), except
/// schema-level ones, which are prefixed with `schema.`. The schema is assumed to have passed
/// [`validate::schema`](crate::validate::schema); an invalid one yields errors, never a panic.
pub fn expand(
    job_id: &JobId,
    spec: &JobSpec,
    schema: &Schema,
    datasets: &[Dataset],
    computes: &[Compute],
) -> Result<Vec<Task>, Vec<ErrorDetail>> {
    let mut errors = Vec::new();
    let datasets_by_id: HashMap<&DatasetId, &Dataset> =
        datasets.iter().map(|d| (&d.id, d)).collect();

    // Which datasets each data role reads, as (group label, dataset id) in data-spec order.
    let mut role_data: HashMap<&str, Vec<(&str, &DatasetId, bool)>> = HashMap::new();
    for (entry_idx, entry) in spec.data_spec.iter().enumerate() {
        let path = format!("dataSpec[{entry_idx}]");
        let Some(role) = schema.roles.iter().find(|r| r.name == entry.role) else {
            errors.push(detail(format!("{path}.role"), format!("unknown role {:?}", entry.role)));
            continue;
        };
        if !role.is_data_consumer {
            errors.push(detail(
                format!("{path}.role"),
                format!("role {:?} does not consume data (isDataConsumer is false)", role.name),
            ));
            continue;
        }
        let associations = group_associations(schema, role);
        let listed = role_data.entry(role.name.as_str()).or_default();
        for (label, ids) in &entry.dataset_groups {
            let group_path = format!("{path}.datasetGroups.{label}");
            let matching = associations.iter().filter(|a| a.values().any(|g| g == label)).count();
            if matching == 0 {
                errors.push(detail(
                    group_path.clone(),
                    format!(
                        "group {label:?} is in no groupAssociation entry of role {:?}",
                        role.name
                    ),
                ));
            } else if matching > 1 {
                errors.push(detail(
                    group_path.clone(),
                    format!(
                        "group {label:?} is in {matching} groupAssociation entries of role {:?}; \
                         use a label that picks one",
                        role.name
                    ),
                ));
            }
            if ids.is_empty() {
                errors.push(detail(group_path.clone(), "lists no dataset"));
            }
            for (id_idx, id) in ids.iter().enumerate() {
                let id_path = format!("{group_path}[{id_idx}]");
                if !datasets_by_id.contains_key(id) {
                    errors.push(detail(id_path, format!("unknown dataset {id}")));
                } else if listed.iter().any(|(_, seen, _)| *seen == id) {
                    errors.push(detail(
                        id_path,
                        format!("dataset {id} is listed twice for role {:?}", role.name),
                    ));
                } else {
                    listed.push((label.as_str(), id, entry.participant_run));
                }
            }
        }
    }
    for role in schema.roles.iter().filter(|r| r.is_data_consumer) {
        if !spec.data_spec.iter().any(|e| e.role == role.name) {
            errors.push(detail(
                "dataSpec",
                format!("data-consuming role {:?} has no datasets", role.name),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut tasks = Vec::new();
    for role in &schema.roles {
        let associations = group_associations(schema, role);
        let mut index: u32 = 0;
        let mut push = |group_association: BTreeMap<String, String>,
                        dataset: Option<&Dataset>,
                        participant_run: bool,
                        tasks: &mut Vec<Task>| {
            let compute_id = dataset.map_or_else(
                || ComputeId::new(DEFAULT_COMPUTE),
                |d| compute_for_realm(&d.spec.realm, computes),
            );
            tasks.push(Task {
                job_id: job_id.clone(),
                task_id: task_id(job_id, &role.name, index, &group_association),
                role: role.name.clone(),
                index,
                group_association,
                dataset_id: dataset.map(|d| d.id.clone()),
                compute_id,
                managed: !(role.participant_run || participant_run),
                state: TaskState::Ready,
                log: String::new(),
                updated_at: None,
                last_heartbeat: None,
                restarts: 0,
            });
            index += 1;
        };
        if role.is_data_consumer {
            for (label, id, participant_run) in
                role_data.get(role.name.as_str()).into_iter().flatten()
            {
                let association = associations
                    .iter()
                    .find(|a| a.values().any(|g| g == label))
                    .expect("labels were checked against the role's entries above");
                let dataset = datasets_by_id.get(id).expect("dataset ids were checked above");
                push(association.clone(), Some(dataset), *participant_run, &mut tasks);
            }
        } else {
            for association in &associations {
                for _ in 0..role.replicas() {
                    push(association.clone(), None, false, &mut tasks);
                }
            }
        }
    }

    let idle = idle_tasks(schema, &tasks);
    if !idle.is_empty() {
        return Err(idle);
    }
    Ok(tasks)
}

/// A role's group association entries, completed: a channel the role is in that an entry
/// omits, and that has a single group, is filled in with that group; a role without entries
/// gets one implicit entry. Entries naming channels the role is not in are kept as written
/// (validation reports them).
pub fn group_associations(schema: &Schema, role: &Role) -> Vec<BTreeMap<String, String>> {
    let single_groups: Vec<(&str, String)> = schema
        .channels
        .iter()
        .filter(|c| c.pair.contains(&role.name))
        .filter_map(|c| match c.group_labels().as_slice() {
            [only] => Some((c.name.as_str(), only.clone())),
            _ => None,
        })
        .collect();
    let mut entries = role.group_association.clone();
    if entries.is_empty() {
        entries.push(BTreeMap::new());
    }
    for entry in &mut entries {
        for (channel, group) in &single_groups {
            entry.entry((*channel).to_owned()).or_insert_with(|| group.clone());
        }
    }
    entries
}

/// The compute that hosts a dataset of `realm`: the one whose region is the longest
/// path-segment prefix of the realm (ties go to the smallest compute id), else `default`.
pub fn compute_for_realm(realm: &str, computes: &[Compute]) -> ComputeId {
    computes
        .iter()
        .filter(|c| region_serves(&c.region, realm))
        .max_by(|a, b| {
            segments(&a.region)
                .cmp(&segments(&b.region))
                .then_with(|| b.compute_id.cmp(&a.compute_id))
        })
        .map_or_else(|| ComputeId::new(DEFAULT_COMPUTE), |c| c.compute_id.clone())
}

/// Whether `region` is a path-segment prefix of `realm` (`default/eu` serves `default/eu/uk`
/// but not `default/europe`).
pub fn region_serves(region: &str, realm: &str) -> bool {
    let region = region.trim_matches('/');
    let realm = realm.trim_matches('/');
    !region.is_empty()
        && (realm == region || realm.strip_prefix(region).is_some_and(|rest| rest.starts_with('/')))
}

fn segments(region: &str) -> usize {
    region.trim_matches('/').split('/').count()
}

/// A task's stable id: the first 16 hex characters of the SHA-256 of the job id, role, index
/// and (sorted) group association.
pub fn task_id(
    job_id: &JobId,
    role: &str,
    index: u32,
    group_association: &BTreeMap<String, String>,
) -> TaskId {
    // A JSON array is an unambiguous encoding (strings are quoted and escaped), and a BTreeMap
    // serialises in key order, so the hash does not depend on insertion order.
    let canonical = serde_json::json!([job_id.as_str(), role, index, group_association]);
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    let mut res = hex::encode(digest);
    res.truncate(16);
    TaskId(res)
}

/// Idle tasks, one error per (role, group association, cause): a task with no peer in its group
/// of some channel, or one that reaches no data-consuming task at all.
fn idle_tasks(schema: &Schema, tasks: &[Task]) -> Vec<ErrorDetail> {
    let is_data: HashMap<&str, bool> =
        schema.roles.iter().map(|r| (r.name.as_str(), r.is_data_consumer)).collect();
    // Bucket tasks by (channel, group, role) so neighbours are found without an O(n²) scan.
    let mut members: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
    for (idx, task) in tasks.iter().enumerate() {
        for (channel, group) in &task.group_association {
            members
                .entry((channel.as_str(), group.as_str(), task.role.as_str()))
                .or_default()
                .push(idx);
        }
    }
    let neighbours = |idx: usize| -> Vec<usize> {
        let task = &tasks[idx];
        let mut res = Vec::new();
        for channel in &schema.channels {
            let Some(peer) = channel.peer_role(&task.role) else {
                continue;
            };
            let Some(group) = task.group_association.get(&channel.name) else {
                continue;
            };
            if let Some(found) = members.get(&(channel.name.as_str(), group.as_str(), peer)) {
                res.extend(found.iter().copied().filter(|&other| other != idx));
            }
        }
        res
    };
    // Multi-source BFS backwards from every data task: the graph is undirected.
    let mut reaches = vec![false; tasks.len()];
    let mut queue: VecDeque<usize> = VecDeque::new();
    for (idx, task) in tasks.iter().enumerate() {
        if is_data.get(task.role.as_str()).copied().unwrap_or(false) {
            reaches[idx] = true;
            queue.push_back(idx);
        }
    }
    while let Some(idx) = queue.pop_front() {
        for other in neighbours(idx) {
            if !reaches[other] {
                reaches[other] = true;
                queue.push_back(other);
            }
        }
    }
    let mut reported = BTreeSet::new();
    let mut res = Vec::new();
    for (idx, task) in tasks.iter().enumerate() {
        if !reported.insert((task.role.as_str(), &task.group_association)) {
            continue;
        }
        let role_idx = schema
            .roles
            .iter()
            .position(|r| r.name == task.role)
            .expect("tasks are made from schema roles");
        let path = format!("schema.roles[{role_idx}]");
        let groups = task
            .group_association
            .iter()
            .map(|(c, g)| format!("{c}={g}"))
            .collect::<Vec<_>>()
            .join(", ");
        // A task alone in its group of a channel waits for a peer that never comes (an
        // aggregator whose region has no dataset, or a trainer whose region has no
        // aggregator), even when it is connected to data some other way.
        let mut lonely = false;
        for channel in schema.channels.iter().filter(|c| !c.is_self_loop()) {
            let (Some(peer), Some(group)) =
                (channel.peer_role(&task.role), task.group_association.get(&channel.name))
            else {
                continue;
            };
            if !members.contains_key(&(channel.name.as_str(), group.as_str(), peer)) {
                lonely = true;
                res.push(detail(
                    path.clone(),
                    format!(
                        "role {:?} in group {{{groups}}} has no {peer:?} task in group {group:?} \
                         of channel {:?}; list a dataset for that group or remove the entry",
                        task.role, channel.name
                    ),
                ));
            }
        }
        if !lonely && !reaches[idx] {
            res.push(detail(
                path,
                format!(
                    "role {:?} in group {{{groups}}} reaches no data-consuming task; \
                     list a dataset in one of its groups or remove the entry",
                    task.role
                ),
            ));
        }
    }
    res
}

fn detail(path: impl Into<String>, message: impl Into<String>) -> ErrorDetail {
    ErrorDetail { path: path.into(), message: message.into() }
}

/// The expansion as a plain-text table (role, index, group association, dataset, compute,
/// managed, task id), one line per task: the golden files and the examples' `expansion.txt`.
pub fn table(job_id: &JobId, tasks: &[Task]) -> String {
    let header = ["role", "index", "group association", "dataset", "compute", "managed", "task id"];
    let rows: Vec<[String; 7]> = tasks
        .iter()
        .map(|task| {
            [
                task.role.clone(),
                task.index.to_string(),
                task.group_association
                    .iter()
                    .map(|(channel, group)| format!("{channel}={group}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                task.dataset_id.as_ref().map_or_else(|| "-".to_owned(), |d| d.to_string()),
                task.compute_id.to_string(),
                task.managed.to_string(),
                task.task_id.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut res = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        res.truncate(res.trim_end().len());
        res.push('\n');
        res
    };
    let mut out = format!("job {job_id}: {} tasks\n", tasks.len());
    out.push_str(&line(&header));
    for row in &rows {
        out.push_str(&line(&row.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;
    use crate::job::DataSpecEntry;
    use crate::resources::{DatasetSpec, Platform};
    use crate::schema::{ChannelSpec, DEFAULT_GROUP, GroupBy};

    fn compute(id: &str, region: &str) -> Compute {
        Compute {
            compute_id: ComputeId::new(id),
            region: region.to_owned(),
            platform: Platform::Process,
            connected: true,
        }
    }

    fn dataset(id: &str, realm: &str) -> Dataset {
        Dataset {
            id: DatasetId::new(id),
            owner: UserId::new("alice"),
            spec: DatasetSpec {
                name: id.to_owned(),
                url: format!("file:///data/{id}"),
                realm: realm.to_owned(),
                ..Default::default()
            },
        }
    }

    /// Trainers and an aggregator on one channel without `groupBy` and without entries.
    fn two_tier(replica: i64) -> Schema {
        Schema {
            roles: vec![
                Role { name: "trainer".into(), is_data_consumer: true, ..Default::default() },
                Role { name: "aggregator".into(), replica, ..Default::default() },
            ],
            channels: vec![ChannelSpec {
                name: "param-channel".into(),
                pair: vec!["trainer".into(), "aggregator".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn job_with(role: &str, group: &str, ids: &[&str]) -> JobSpec {
        JobSpec {
            name: "test".into(),
            data_spec: vec![DataSpecEntry {
                role: role.into(),
                dataset_groups: [(
                    group.to_owned(),
                    ids.iter().map(|id| DatasetId::new(*id)).collect(),
                )]
                .into(),
                participant_run: false,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn task_ids_are_stable_and_distinct() {
        let job = JobId::new("job-1");
        let eu: BTreeMap<String, String> = [("param-channel".to_owned(), "eu".to_owned())].into();
        let us: BTreeMap<String, String> = [("param-channel".to_owned(), "us".to_owned())].into();
        let id = task_id(&job, "trainer", 0, &eu);
        // Pinned: a change here re-keys every stored task, which must be deliberate.
        assert_eq!(id.as_str(), task_id(&job, "trainer", 0, &eu).as_str());
        assert_eq!(id.as_str().len(), 16);
        assert!(id.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        let others = [
            task_id(&JobId::new("job-2"), "trainer", 0, &eu),
            task_id(&job, "aggregator", 0, &eu),
            task_id(&job, "trainer", 1, &eu),
            task_id(&job, "trainer", 0, &us),
        ];
        for other in &others {
            assert_ne!(&id, other);
        }
        // Field boundaries are unambiguous: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(
            task_id(&JobId::new("ab"), "c", 0, &eu),
            task_id(&JobId::new("a"), "bc", 0, &eu)
        );
    }

    #[test]
    fn reexpanding_yields_the_same_tasks() {
        let schema = two_tier(1);
        let job = job_with("trainer", "default", &["d1", "d2"]);
        let datasets = [dataset("d1", "default"), dataset("d2", "default")];
        let first = expand(&JobId::new("j"), &job, &schema, &datasets, &[]).expect("valid");
        let second = expand(&JobId::new("j"), &job, &schema, &datasets, &[]).expect("valid");
        assert_eq!(first, second);
        let other_job = expand(&JobId::new("k"), &job, &schema, &datasets, &[]).expect("valid");
        assert_ne!(first[0].task_id, other_job[0].task_id);
    }

    #[test]
    fn compute_is_the_longest_segment_prefix_of_the_realm() {
        let computes = [
            compute("root", "default"),
            compute("eu", "default/eu"),
            compute("uk", "default/eu/uk/"),
            compute("europe", "default/europe"),
            compute("asia", "other/asia"),
        ];
        let pick = |realm: &str| compute_for_realm(realm, &computes).0;
        assert_eq!(pick("default/eu/uk"), "uk");
        assert_eq!(pick("default/eu/uk/london"), "uk");
        assert_eq!(pick("default/eu/de"), "eu");
        assert_eq!(pick("default/eu"), "eu");
        assert_eq!(pick("default/europe/x"), "europe");
        assert_eq!(pick("default/us"), "root");
        assert_eq!(pick("defaults/us"), DEFAULT_COMPUTE);
        assert_eq!(pick("other"), DEFAULT_COMPUTE);
        assert_eq!(compute_for_realm("default/eu", &[]).0, DEFAULT_COMPUTE);
        // Two computes for one region: the smallest id wins, whatever the input order.
        let tied = [compute("b", "default/eu"), compute("a", "default/eu")];
        assert_eq!(compute_for_realm("default/eu/uk", &tied).0, "a");
        assert!(!region_serves("", "default"));
    }

    #[test]
    fn replica_below_one_means_one_and_no_group_by_means_default() {
        for replica in [-3, 0, 1] {
            let tasks = expand(
                &JobId::new("j"),
                &job_with("trainer", "default", &["d1"]),
                &two_tier(replica),
                &[dataset("d1", "default")],
                &[],
            )
            .expect("valid");
            let aggregators: Vec<_> = tasks.iter().filter(|t| t.role == "aggregator").collect();
            assert_eq!(aggregators.len(), 1, "replica {replica}");
            let expected: BTreeMap<String, String> =
                [("param-channel".to_owned(), DEFAULT_GROUP.to_owned())].into();
            assert_eq!(aggregators[0].group_association, expected);
            assert_eq!(tasks[0].group_association, expected);
            assert_eq!(aggregators[0].compute_id.as_str(), DEFAULT_COMPUTE);
        }
        let tasks = expand(
            &JobId::new("j"),
            &job_with("trainer", "default", &["d1"]),
            &two_tier(3),
            &[dataset("d1", "default")],
            &[],
        )
        .expect("valid");
        let indexes: Vec<u32> =
            tasks.iter().filter(|t| t.role == "aggregator").map(|t| t.index).collect();
        assert_eq!(indexes, [0, 1, 2]);
    }

    #[test]
    fn participant_run_roles_are_unmanaged_and_data_tasks_carry_their_dataset() {
        let mut schema = two_tier(1);
        schema.roles[0].participant_run = true;
        let tasks = expand(
            &JobId::new("j"),
            &job_with("trainer", "default", &["d1"]),
            &schema,
            &[dataset("d1", "default/eu/uk")],
            &[compute("eu", "default/eu")],
        )
        .expect("valid");
        assert!(!tasks[0].managed);
        assert_eq!(tasks[0].dataset_id, Some(DatasetId::new("d1")));
        assert_eq!(tasks[0].compute_id.as_str(), "eu");
        assert_eq!(tasks[0].state, TaskState::Ready);
        assert!(tasks[1].managed);
        assert_eq!(tasks[1].dataset_id, None);
    }

    #[test]
    fn a_data_spec_entry_makes_only_its_datasets_participant_run() {
        let schema = two_tier(1);
        let mut job = job_with("trainer", "default", &["d1", "d2"]);
        let mut owners = job.data_spec[0].clone();
        owners.dataset_groups = [("default".to_owned(), vec![DatasetId::new("d3")])].into();
        owners.participant_run = true;
        job.data_spec.push(owners);
        let datasets = ["d1", "d2", "d3"].map(|id| dataset(id, "default"));
        let tasks = expand(&JobId::new("j"), &job, &schema, &datasets, &[]).expect("valid");
        let managed: Vec<(Option<&str>, bool)> = tasks
            .iter()
            .map(|t| (t.dataset_id.as_ref().map(DatasetId::as_str), t.managed))
            .collect();
        assert_eq!(
            managed,
            [(Some("d1"), true), (Some("d2"), true), (Some("d3"), false), (None, true)]
        );
        // A dataset listed by both entries is still reported once as listed twice.
        job.data_spec[1].dataset_groups =
            [("default".to_owned(), vec![DatasetId::new("d2")])].into();
        let errors = expand(&JobId::new("j"), &job, &schema, &datasets, &[]).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("listed twice"), "{errors:?}");
    }

    #[test]
    fn an_aggregator_without_trainers_in_its_group_is_an_error() {
        let mut schema = two_tier(1);
        schema.channels[0].group_by =
            Some(GroupBy { kind: "tag".into(), value: vec!["eu".into(), "us".into()] });
        let eu: BTreeMap<String, String> = [("param-channel".to_owned(), "eu".to_owned())].into();
        let us: BTreeMap<String, String> = [("param-channel".to_owned(), "us".to_owned())].into();
        schema.roles[0].group_association = vec![eu.clone(), us.clone()];
        schema.roles[1].group_association = vec![eu, us];
        let errors = expand(
            &JobId::new("j"),
            &job_with("trainer", "eu", &["d1"]),
            &schema,
            &[dataset("d1", "default")],
            &[],
        )
        .expect_err("the us aggregator idles");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "schema.roles[1]");
        assert!(
            errors[0].message.contains("\"aggregator\"")
                && errors[0].message.contains("param-channel=us"),
            "{}",
            errors[0].message
        );
    }
}
