//! Properties of expansion over generated hierarchical topologies.

use std::collections::{BTreeMap, HashSet};

use fledge_types::{
    ChannelSpec, Compute, ComputeId, DataSpecEntry, Dataset, DatasetId, DatasetSpec, GroupBy,
    JobId, JobSpec, Platform, Role, Schema, UserId, expand, validate,
};
use proptest::prelude::*;

/// Trainers → one middle aggregator per region (with `replica` copies) → one top aggregator;
/// `datasets[r]` datasets in region `r`.
fn hierarchical(datasets: &[usize], replica: i64) -> (Schema, JobSpec, Vec<Dataset>) {
    let regions: Vec<String> = (0..datasets.len()).map(|r| format!("r{r}")).collect();
    let entry = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(c, g)| ((*c).to_owned(), (*g).to_owned())).collect()
    };
    let schema = Schema {
        roles: vec![
            Role {
                name: "trainer".into(),
                is_data_consumer: true,
                group_association: regions.iter().map(|r| entry(&[("param", r)])).collect(),
                ..Default::default()
            },
            Role {
                name: "middle".into(),
                replica,
                group_association: regions
                    .iter()
                    .map(|r| entry(&[("param", r), ("global", "default")]))
                    .collect(),
                ..Default::default()
            },
            Role { name: "top".into(), ..Default::default() },
        ],
        channels: vec![
            ChannelSpec {
                name: "param".into(),
                pair: vec!["trainer".into(), "middle".into()],
                group_by: Some(GroupBy { kind: "tag".into(), value: regions.clone() }),
                ..Default::default()
            },
            ChannelSpec {
                name: "global".into(),
                pair: vec!["top".into(), "middle".into()],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let mut all = Vec::new();
    let mut groups = BTreeMap::new();
    for (r, n) in datasets.iter().enumerate() {
        let ids: Vec<DatasetId> = (0..*n).map(|i| DatasetId::new(format!("d{r}-{i}"))).collect();
        for id in &ids {
            all.push(Dataset {
                id: id.clone(),
                owner: UserId::new("alice"),
                spec: DatasetSpec {
                    name: id.to_string(),
                    url: format!("file:///{id}"),
                    realm: format!("default/r{r}/site"),
                    ..Default::default()
                },
            });
        }
        groups.insert(format!("r{r}"), ids);
    }
    let job = JobSpec {
        name: "prop".into(),
        design_id: "d".into(),
        data_spec: vec![DataSpecEntry {
            role: "trainer".into(),
            dataset_groups: groups,
            participant_run: false,
        }],
        ..Default::default()
    };
    (schema, job, all)
}

proptest! {
    #[test]
    fn expansion_counts_ids_and_placement(
        datasets in proptest::collection::vec(1usize..5, 1..5),
        replica in -1i64..4,
    ) {
        let (schema, job, all) = hierarchical(&datasets, replica);
        prop_assert!(validate::schema(&schema).is_empty());
        let computes: Vec<Compute> = (0..datasets.len())
            .map(|r| Compute {
                compute_id: ComputeId::new(format!("c{r}")),
                region: format!("default/r{r}"),
                platform: Platform::Process,
                connected: true,
            })
            .collect();
        let tasks = expand::expand(&JobId::new("j"), &job, &schema, &all, &computes)
            .expect("valid topology");
        let replicas = usize::try_from(replica.max(1)).expect("small");
        let n_datasets: usize = datasets.iter().sum();
        prop_assert_eq!(tasks.len(), n_datasets + datasets.len() * replicas + 1);
        let ids: HashSet<_> = tasks.iter().map(|t| &t.task_id).collect();
        prop_assert_eq!(ids.len(), tasks.len(), "task ids are unique");
        for task in tasks.iter().filter(|t| t.role == "trainer") {
            let region = &task.group_association["param"];
            prop_assert_eq!(task.compute_id.as_str(), format!("c{}", &region[1..]));
        }
        let again = expand::expand(&JobId::new("j"), &job, &schema, &all, &computes)
            .expect("valid topology");
        prop_assert_eq!(again, tasks);
    }

    #[test]
    fn a_region_without_datasets_is_reported(
        datasets in proptest::collection::vec(0usize..3, 2..5),
    ) {
        prop_assume!(datasets.contains(&0) && datasets.iter().any(|n| *n > 0));
        let (schema, mut job, all) = hierarchical(&datasets, 1);
        job.data_spec[0].dataset_groups.retain(|_, ids| !ids.is_empty());
        let errors = expand::expand(&JobId::new("j"), &job, &schema, &all, &[])
            .expect_err("an idle middle aggregator");
        let empty = datasets.iter().filter(|n| **n == 0).count();
        prop_assert_eq!(errors.len(), empty, "{:?}", errors);
        prop_assert!(errors.iter().all(|e| e.path == "schema.roles[1]"));
    }
}
